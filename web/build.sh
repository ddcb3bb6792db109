#!/usr/bin/env bash
# Bundles the browser client into web/dist/app.js (checked in: the server
# embeds it, with src/index.html and src/app.css as they are).
# The output is byte-for-byte reproducible: pinned tools from package-lock.json,
# no source maps, no timestamps. Runs from any directory.
#   web/build.sh              build
#   web/build.sh --deps-only  only install the pinned packages (scripts/setup.sh)
#   web/build.sh --check      build, then fail if dist/ differs from what is committed
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
mode="${1:-build}"

# Dependencies: installed exactly as locked, again whenever the lock is newer.
if [[ ! -d node_modules || package-lock.json -nt node_modules ]]; then
  npm ci --no-audit --no-fund
  touch node_modules
fi
if [[ "$mode" == "--deps-only" ]]; then
  exit 0
fi

# TypeScript from the protos, generated at each build (not checked in).
rm -rf gen
mkdir -p gen
protos=()
while IFS= read -r proto; do protos+=("$proto"); done < <(cd ../proto && find messenger/v1 -name '*.proto' | LC_ALL=C sort)
protoc \
  --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es \
  --es_out=gen \
  --es_opt=target=ts \
  -I ../proto \
  "${protos[@]}"

node_modules/.bin/tsc --noEmit -p .

mkdir -p dist
node_modules/.bin/esbuild src/main.ts \
  --bundle \
  --minify \
  --format=esm \
  --target=es2022 \
  --legal-comments=none \
  --log-level=warning \
  --outfile=dist/app.js
echo "web/dist: $(wc -c < dist/app.js) bytes app.js (the server serves it with src/index.html and src/app.css)"
if [[ "$mode" == "--check" ]] && ! git diff --quiet -- dist; then
  git diff --stat -- dist >&2
  echo "web/dist is not what web/src builds: run web/build.sh and commit dist/" >&2
  exit 1
fi
