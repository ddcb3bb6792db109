#!/usr/bin/env bash
# A cached Python venv for checks that run real Python tools:
#   scripts/python-venv.sh NAME REQUIREMENTS
# makes ~/.cache/messenger/NAME-venv from the pinned REQUIREMENTS file (a
# path from the repository root), outside the checkout so clean clones and
# CI reuse it, made again only when the requirements change, and prints
# the venv's path. Used for the chart checks (helm/tests/requirements.txt,
# scripts/chart.sh) and the Web Push cross-check
# (services/notify/tests/push/requirements.txt). Called by scripts/setup.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
name="$1"
requirements="$root/$2"
venv="${MESSENGER_CACHE:-$HOME/.cache/messenger}/$name-venv"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ "$(cat "$venv/.requirements-sha256" 2>/dev/null)" != "$wanted" ]; then
    # tomllib (the chart's ConfigMap test) needs Python 3.11.
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "python-venv: python3 3.11 or newer is needed, found $(python3 --version 2>&1)" >&2
        exit 1
    fi
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "python-venv: installing python3-venv" >&2
        as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo)
        "${as_root[@]}" apt-get update -qq
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    echo "python-venv: installing $2 into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" >&2
    echo "$wanted" > "$venv/.requirements-sha256"
fi
echo "$venv"
