#!/usr/bin/env bash
# Checks the Helm chart (helm/messenger) and the image recipe (Dockerfile):
#   scripts/chart.sh [pytest arguments]
# Helm's own lint (strict) and render through its Go SDK, every rendered
# manifest against the Kubernetes schemas of the oldest and newest supported
# versions (unknown fields refused), properties of the rendered objects
# (NetworkPolicy, probes, security contexts, grace periods, the services'
# TOML), the values schema refusing unknown keys, and hadolint on the
# Dockerfile. With MESSENGER_BIN=<built messenger> the rendered TOML files
# are also loaded by the binary (`config --check`). No cluster, no Docker.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(bash scripts/python-venv.sh chart helm/tests/requirements.txt)"
# No __pycache__ or .pytest_cache in the checkout.
PYTHONDONTWRITEBYTECODE=1 exec "$venv/bin/python" -m pytest -q -p no:cacheprovider helm/tests "$@"
