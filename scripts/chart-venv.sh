#!/usr/bin/env bash
# The Python environment the chart checks run in (helm/tests/requirements.txt):
# a venv under ~/.cache/messenger, outside the checkout so clean clones and
# CI reuse it, made again only when the requirements change. Prints the
# venv's path. Called by scripts/setup.sh and scripts/chart.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
requirements="$root/helm/tests/requirements.txt"
venv="${MESSENGER_CACHE:-$HOME/.cache/messenger}/chart-venv"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat "$venv/.requirements-sha256" 2>/dev/null)" != "$wanted" ]; then
    # tomllib (the ConfigMap test) needs Python 3.11.
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "chart-venv: python3 3.11 or newer is needed, found $(python3 --version 2>&1)" >&2
        exit 1
    fi
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "chart-venv: installing python3-venv" >&2
        as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
        "${as_root[@]}" apt-get update -qq
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    echo "chart-venv: installing the chart checks' Python packages into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" >&2
    echo "$wanted" > "$venv/.requirements-sha256"
fi
echo "$venv"
