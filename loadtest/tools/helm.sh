#!/usr/bin/env bash
# Builds Helm (helm.sh/helm/v4/cmd/helm at the version below, from the Go module proxy) into
#   ${STSLOCK_CACHE:-$HOME/.cache/stslock}/tools/helm-<version>/helm
# and prints its path. Does nothing (but print it) when it is already built.
set -euo pipefail

version=v4.3.2
cache="${STSLOCK_CACHE:-$HOME/.cache/stslock}"
out="$cache/tools/helm-$version"
if [[ -x "$out/helm" ]]; then
	echo "$out/helm"
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
echo "helm.sh: building helm $version into $out (a few minutes when cold)" >&2
GOBIN="$tmp" nice -n 19 go install -trimpath -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@$version"
rm -rf "$out"
mv "$tmp" "$out"
echo "helm.sh: built in $(($(date +%s) - start)) s" >&2
echo "$out/helm"
