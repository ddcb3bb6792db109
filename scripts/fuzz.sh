#!/usr/bin/env bash
# Runs every fuzz target (cargo fuzz, libFuzzer) for SECONDS each, starting
# from and adding to its corpus under fuzz/corpus/<target>:
#   scripts/fuzz.sh            # 300 s per target, optimised build (a real session)
#   scripts/fuzz.sh 15 dev     # what scripts/test.sh runs
# A crash leaves its input under fuzz/artifacts/<target>/ and fails the run.
#
# The second argument picks the build: `release` (the default: fast
# executions for long sessions) or `dev` (unoptimised, with debug
# assertions and overflow checks: it builds in about a third of the time,
# which is what a short replay of the corpus in the test command wants).
# Either is a workspace build of its own: the coverage instrumentation
# changes every crate's flags, so nothing of the main target dir is reused.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${1:-300}"
build="${2:-release}"
case "$build" in
    release) build_flag=(--release) ;;
    dev) build_flag=(--dev) ;;
    *) echo "fuzz: the build is release or dev, not $build" >&2; exit 2 ;;
esac
PATH="$(bash "$root/scripts/cargo-tools.sh"):$PATH"
cd "$root/fuzz"
# On the stable toolchain, without a sanitizer (AddressSanitizer needs
# nightly; the code is `unsafe`-free): a panic anywhere aborts, and libFuzzer's
# coverage instrumentation works as is.
for target in client_frames token config; do
    echo "fuzz: $target for ${seconds}s"
    # A scratch corpus dir takes the new inputs; the kept corpus stays as committed.
    scratch="$(mktemp -d)"
    cargo fuzz run --sanitizer none "${build_flag[@]}" "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1
    rm -rf "$scratch"
done
