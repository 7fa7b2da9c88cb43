#!/usr/bin/env bash
# Makes sure the Debian packages kvsparse builds and tests with are installed. Asks apt only when one is
# missing (so a machine that has them all needs no network), and installs only when running as root.
# Elsewhere it prints the command to run and carries on; configuring then says what is really missing.
set -euo pipefail

packages=(cmake ninja-build g++ catch2 libbenchmark-dev libfmt-dev libcli11-dev nlohmann-json3-dev python3)

if ! command -v dpkg >/dev/null 2>&1; then
    echo "install-deps: no dpkg here; install by hand: ${packages[*]}" >&2
    exit 0
fi

missing=()
for package in "${packages[@]}"; do
    if ! dpkg -s "$package" >/dev/null 2>&1; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-deps: missing ${missing[*]}; as root: apt-get install ${missing[*]}" >&2
fi
