#!/usr/bin/env bash
# The one command that runs every test on a fresh machine:
#   scripts/test.sh
# It installs what is missing (scripts/setup.sh), checks formatting, lints and
# dependencies (cargo deny), runs each fuzz target briefly from its corpus,
# then the whole workspace suite with nextest, plus doc tests, then the Helm
# chart checks (scripts/chart.sh) and the web app's browser tests
# (scripts/browser-tests.sh). The Scylla
# store's tests run on one Apache Cassandra 5.0 node the first of them starts
# (crates/testkit/src/cassandra.rs); it is stopped when this script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

stop_shared_cassandra() {
    local pid_file=target/cassandra-shared/pid
    if [ -f "$pid_file" ]; then
        kill "$(cat "$pid_file")" 2>/dev/null || true
        rm -f "$pid_file"
    fi
}
trap stop_shared_cassandra EXIT

bash scripts/setup.sh
# The pinned, prebuilt cargo-nextest, cargo-deny and cargo-fuzz come first.
PATH="$(bash scripts/cargo-tools.sh):$PATH"
cargo fmt --all -- --check
# No import circle among each crate's modules (a module and its submodules are one unit).
python3 scripts/module-cycles.py
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo deny --locked check --hide-inclusion-graph licenses bans sources
# A short run: it replays the kept corpus and explores for a few seconds,
# on an unoptimised build (a third of the release build's time).
bash scripts/fuzz.sh "${FUZZ_SECONDS:-15}" dev
cargo test --doc --workspace --locked
status=0
cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?
# The Helm chart and the Dockerfile (scripts/chart.sh); the rendered service
# TOML files are loaded by the binary nextest just built for the end-to-end
# tests (`config --check`).
MESSENGER_BIN=target/debug/messenger bash scripts/chart.sh || status=$?
# The web app in headless Chromium against that binary's `messenger up`
# (scripts/browser-tests.sh), after checking the committed bundle is what
# web/src builds.
MESSENGER_BIN=target/debug/messenger bash scripts/browser-tests.sh || status=$?
# The end-to-end suite again with the message store on the Cassandra node
# (in-process systems and the multi-process cluster, each on a keyspace of
# its own), one test at a time: the node shares the two cores.
MESSENGER_TEST_STORE=scylla cargo nextest run -p messenger --test e2e --locked --no-fail-fast --test-threads 1 "$@" \
    || status=$?
exit "$status"
