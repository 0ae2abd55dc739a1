#!/usr/bin/env bash
# Builds the operator image IMG (default ghcr.io/stslock/stslock:<crate version>):
#   deploy/image/build.sh [IMG] [--oci-archive PATH]
# 1. `cargo build --release --no-default-features --bin stslock` (CARGO_TARGET_DIR is honoured);
# 2. stages the build context: Containerfile + rootfs/ (the binary, the shared libraries `ldd`
#    lists for it, /etc/passwd and /etc/group with user 65532, CA certificates);
# 3. builds with docker when a docker daemon answers, else with buildah (storage driver vfs,
#    isolation chroot: no daemon, no privileges beyond root's files);
# 4. with --oci-archive, also saves the image as an OCI archive.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
version="$(awk -F'"' '/^version = / { print $2; exit }' "$root/Cargo.toml")"
img="ghcr.io/stslock/stslock:$version"
archive=""
while [[ $# -gt 0 ]]; do
	case "$1" in
	--oci-archive) archive="$2"; shift 2 ;;
	-*) echo "build.sh: unknown flag $1" >&2; exit 2 ;;
	*) img="$1"; shift ;;
	esac
done

echo "build.sh: cargo build --release --no-default-features --bin stslock" >&2
(cd "$root" && cargo build --release --no-default-features --bin stslock -q)
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/release/stslock"
[[ -x "$bin" ]] || { echo "build.sh: $bin was not built" >&2; exit 1; }

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp"
chmod 1777 "$ctx/rootfs/tmp"
cp "$root/Containerfile" "$ctx/Containerfile"
install -m 0755 "$bin" "$ctx/rootfs/stslock"
# The dynamic loader and every library the binary links, at the paths it looks for them.
while read -r lib; do
	[[ -n "$lib" ]] || continue
	mkdir -p "$ctx/rootfs$(dirname "$lib")"
	cp -L "$lib" "$ctx/rootfs$lib"
done < <(ldd "$bin" | awk '/=>/ && $3 ~ /^\// { print $3 } !/=>/ && $1 ~ /^\// { print $1 }')
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ctx/rootfs/etc/group"
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
	cp /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/"
fi

args=(--build-arg "VERSION=$version" -t "$img" -f "$ctx/Containerfile" "$ctx")
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
	echo "build.sh: docker build -t $img" >&2
	docker build "${args[@]}"
	[[ -z "$archive" ]] || docker save "$img" -o "$archive"
else
	command -v buildah >/dev/null || {
		echo "build.sh: neither a docker daemon nor buildah (apt-get install buildah)" >&2
		exit 1
	}
	export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}" BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
	echo "build.sh: buildah bud -t $img (storage $STORAGE_DRIVER, isolation $BUILDAH_ISOLATION)" >&2
	buildah bud --quiet --layers=false "${args[@]}" >/dev/null
	if [[ -n "$archive" ]]; then
		rm -f "$archive"
		buildah push --quiet "$img" "oci-archive:$archive:$img"
	fi
fi
echo "$img"
