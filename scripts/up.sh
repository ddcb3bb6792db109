#!/usr/bin/env bash
# Starts the whole system in one process with embedded defaults:
#   scripts/up.sh            (data in ./data; extra flags go to `messenger up`)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked -p messenger
exec target/release/messenger up "$@"
