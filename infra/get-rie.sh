#!/bin/sh
# Puts the real Lambda RIE binary at $1, taken from the hash-pinned aws-sam-cli wheel on PyPI.
set -eu
dest="$1"
pip="${PIP:-pip}"
[ -x "$dest" ] && exit 0
arch=$(uname -m)
case "$arch" in
    x86_64) member=samcli/local/rapid/aws-lambda-rie-x86_64 ;;
    aarch64 | arm64) member=samcli/local/rapid/aws-lambda-rie-arm64 ;;
    *) echo "get-rie: no RIE build for $arch" >&2; exit 1 ;;
esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$pip" download --quiet --no-deps --require-hashes -r "$(dirname "$0")/requirements-rie.txt" -d "$tmp"
mkdir -p "$(dirname "$dest")"
python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
    "$tmp"/aws_sam_cli-*.whl "$member" > "$dest.part"
chmod +x "$dest.part"
mv "$dest.part" "$dest"
