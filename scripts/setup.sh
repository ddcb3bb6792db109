#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine:
# protoc (tonic code generation), redis-server and etcd-server (the tests
# start real ones), curl (an independent gRPC-over-TLS client in the tests),
# and the cargo tools the checks use: cargo-nextest, cargo-deny (licenses,
# bans, sources) and cargo-fuzz (libFuzzer targets). Safe to run again.
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "setup: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

debian_packages=(protobuf-compiler redis-server etcd-server curl)
missing=()
for package in "${debian_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# From crates.io, built here (about 15, 5 and 1 minutes on 2 cores the first time).
cargo_tools=("nextest:cargo-nextest" "deny:cargo-deny" "fuzz:cargo-fuzz")
for tool in "${cargo_tools[@]}"; do
    subcommand="${tool%%:*}" crate="${tool#*:}"
    if ! cargo "$subcommand" --version >/dev/null 2>&1; then
        echo "setup: installing $crate"
        cargo install "$crate" --locked
    fi
done
