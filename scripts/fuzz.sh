#!/usr/bin/env bash
# Runs every fuzz target (cargo fuzz, libFuzzer) for SECONDS each, starting
# from and adding to its corpus under fuzz/corpus/<target>:
#   scripts/fuzz.sh            # 300 s per target (a real session)
#   scripts/fuzz.sh 20         # what scripts/test.sh runs
# A crash leaves its input under fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-300}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# On the stable toolchain, without a sanitizer (AddressSanitizer needs
# nightly; the code is `unsafe`-free): a panic anywhere aborts, and libFuzzer's
# coverage instrumentation works as is.
for target in client_frames token config; do
    echo "fuzz: $target for ${seconds}s"
    # A scratch corpus dir takes the new inputs; the kept corpus stays as committed.
    scratch="$(mktemp -d)"
    cargo fuzz run --sanitizer none --release "$target" "$scratch" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1
    rm -rf "$scratch"
done
