#!/usr/bin/env bash
# The one command that runs every test on a fresh machine:
#   scripts/test.sh
# It installs what is missing (scripts/setup.sh), checks formatting, lints and
# dependencies (cargo deny), runs each fuzz target briefly from its corpus,
# then the whole workspace suite with nextest, plus doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo deny --locked check --hide-inclusion-graph licenses bans sources
# A short run: it replays the kept corpus and explores for a few seconds.
bash scripts/fuzz.sh "${FUZZ_SECONDS:-15}"
cargo test --doc --workspace --locked
# Last, so its summary line closes the run.
cargo nextest run --workspace --locked --no-fail-fast "$@"
