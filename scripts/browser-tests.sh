#!/usr/bin/env bash
# The web app's browser tests (web/tests/): first checks that the committed
# bundle web/dist/app.js is what web/src builds, then runs the tests in
# headless Chromium against the real server, `messenger up` on free loopback
# ports, started by each test file (web/tests/server.mjs).
#
#   MESSENGER_BIN  the server binary, relative to the repository root
#                  (default target/debug/messenger; build it first: it embeds
#                  the app, and the tests refuse a binary older than web/)
#   CHROMIUM       the browser (default /usr/bin/chromium)
#
# To refresh the README's screenshots (docs/screenshots/conversation.png and
# conversation-list.png):
#   MESSENGER_SCREENSHOTS=docs/screenshots bash scripts/browser-tests.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash web/build.sh --check
MESSENGER_BIN="${MESSENGER_BIN:-target/debug/messenger}" node --test --test-concurrency=1 web/tests/
