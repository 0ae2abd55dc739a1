#!/usr/bin/env bash
# Builds one of the ecosystem's own tools the tests use, from the Go module proxy, at the
# version pinned below:
#   loadtest/tools/tool.sh promtool   # Prometheus's promtool (rule checks and rule unit tests)
#   loadtest/tools/tool.sh helm       # Helm 4 (the chart's lint, template)
# into ${STSLOCK_CACHE:-$HOME/.cache/stslock}/tools/<tool>-<version>/<tool> and prints its path.
# Does nothing (but print it) when that build exists. Go caches live under the same cache root
# as the control plane's (go/mod, go/build). The build is niced: it shares the machine.
set -euo pipefail

case "${1:-}" in
promtool)
	# Prometheus 3.16; remove_all_sd leaves out the service discoveries (cloud SDKs) promtool
	# does not need for rules.
	pkg=github.com/prometheus/prometheus/cmd/promtool version=v0.316.0 tags=remove_all_sd ;;
helm) pkg=helm.sh/helm/v4/cmd/helm version=v4.3.2 tags="" ;;
*) echo "usage: $0 promtool|helm" >&2; exit 2 ;;
esac
tool="$1"
cache="${STSLOCK_CACHE:-$HOME/.cache/stslock}"
out="$cache/tools/$tool-$version"
if [[ -x "$out/$tool" ]]; then
	echo "$out/$tool"
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
echo "tool.sh: building $tool $version into $out (minutes when cold)" >&2
GOBIN="$tmp" nice -n 19 go install -tags "$tags" -trimpath -ldflags "-s -w" "$pkg@$version"
rm -rf "$out"
mv "$tmp" "$out"
echo "tool.sh: built $tool in $(($(date +%s) - start)) s" >&2
echo "$out/$tool"
