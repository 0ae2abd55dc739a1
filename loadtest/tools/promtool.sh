#!/usr/bin/env bash
# Builds Prometheus's own `promtool` (github.com/prometheus/prometheus/cmd/promtool at the version
# below, from the Go module proxy) into
#   ${STSLOCK_CACHE:-$HOME/.cache/stslock}/tools/promtool-<version>/promtool
# and prints its path. Does nothing (but print it) when it is already built.
# Go caches live under the same cache root as the control plane's (go/mod, go/build).
set -euo pipefail

version=v0.316.0 # Prometheus 3.16
cache="${STSLOCK_CACHE:-$HOME/.cache/stslock}"
out="$cache/tools/promtool-$version"
if [[ -x "$out/promtool" ]]; then
	echo "$out/promtool"
	exit 0
fi
export GOMODCACHE="${GOMODCACHE:-$cache/go/mod}"
export GOCACHE="${GOCACHE:-$cache/go/build}"
export CGO_ENABLED=0
export GOFLAGS="-buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
tmp="$out.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
start=$(date +%s)
echo "promtool.sh: building promtool $version into $out (a few minutes when cold)" >&2
GOBIN="$tmp" nice -n 19 go install -trimpath -ldflags "-s -w" \
	"github.com/prometheus/prometheus/cmd/promtool@$version"
rm -rf "$out"
mv "$tmp" "$out"
echo "promtool.sh: built in $(($(date +%s) - start)) s" >&2
echo "$out/promtool"
