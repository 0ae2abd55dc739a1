#!/usr/bin/env bash
# Builds stslock-otelcol (main.go: the OpenTelemetry Collector's OTLP receiver and file exporter,
# at the versions of go.mod) into
#   ${STSLOCK_CACHE:-$HOME/.cache/stslock}/tools/otelcol-<hash of go.mod, go.sum, main.go>/stslock-otelcol
# and prints its path. Does nothing (but print it) when that build exists.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${STSLOCK_CACHE:-$HOME/.cache/stslock}"
key="$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-12)"
out="$cache/tools/otelcol-$key"
if [[ -x "$out/stslock-otelcol" ]]; then
	echo "$out/stslock-otelcol"
	exit 0
fi
export GOMODCACHE="${GOMODCACHE:-$cache/go/mod}"
export GOCACHE="${GOCACHE:-$cache/go/build}"
export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
start=$(date +%s)
echo "otelcol/build.sh: building the collector into $out (a few minutes when cold)" >&2
(cd "$here" && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$tmp/stslock-otelcol" .)
rm -rf "$out"
mv "$tmp" "$out"
echo "otelcol/build.sh: built in $(($(date +%s) - start)) s" >&2
echo "$out/stslock-otelcol"
