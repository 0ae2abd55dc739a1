#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, etcd (and the pki helper) at the versions
# pinned in go.mod into
#   ${STSLOCK_CACHE:-$HOME/.cache/stslock}/controlplane/<k8s-version>-<etcd-version>/bin/
# and prints that directory. Does nothing (but print it) when that build is already complete.
# Go caches live under the same cache root (go/mod, go/build) so CI can keep them.
# The build is niced: it shares the machine with Rust builds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${STSLOCK_CACHE:-$HOME/.cache/stslock}"

# The versions come from go.mod alone, so the cache key cannot disagree with the build.
version_of() { awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$here/go.mod"; }
k8s="$(version_of k8s.io/kubernetes)"
etcd="$(version_of go.etcd.io/etcd/server/v3)"
if [[ -z "$k8s" || -z "$etcd" ]]; then
	echo "build.sh: cannot read the k8s.io/kubernetes and etcd versions from $here/go.mod" >&2
	exit 1
fi
out="$cache/controlplane/${k8s#v}-${etcd#v}"
bins=(kube-apiserver kube-controller-manager etcd pki)

complete() {
	[[ -f "$out/bin/.complete" ]] || return 1
	for b in "${bins[@]}"; do [[ -x "$out/bin/$b" ]] || return 1; done
}

if complete; then
	echo "$out/bin"
	exit 0
fi

export GOMODCACHE="${GOMODCACHE:-$cache/go/mod}"
export GOCACHE="${GOCACHE:-$cache/go/build}"
export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false"
# k8s.io/kubernetes v1.34 needs Go >= 1.24; the machine's Go 1.26 is enough. A newer pin that
# needs more would set: export GOTOOLCHAIN=go1.27.3
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

minor="${k8s#v1.}"
minor="${minor%%.*}"
pkg=k8s.io/component-base/version
ldflags="-s -w \
 -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor \
 -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"

tmp="$out/bin.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
start=$(date +%s)
echo "build.sh: building kubernetes $k8s and etcd $etcd into $out/bin (this takes long when cold)" >&2
(cd "$here" && nice -n 19 go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
	./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/etcd ./cmd/pki)
touch "$tmp/.complete"
rm -rf "$out/bin"
mv "$tmp" "$out/bin"
echo "build.sh: built in $(($(date +%s) - start)) s" >&2
echo "$out/bin"
