#!/bin/sh
# Build a static (CGO_ENABLED=0) containerd, containerd-shim-runc-v2 and ctr from Debian 12's
# own containerd source package and Debian's golang-*-dev packages, offline, in GOPATH mode
# (as dh-golang builds the .deb), for lab nodes whose glibc is older than the .deb needs
# (Debian 11: 2.31; the .deb needs 2.34).
#
# Usage (as root, INSIDE the build chroot): build-static-containerd.sh DSC OUTDIR
#   DSC     containerd_*.dsc fetched with `apt-get source --download-only containerd`
#   OUTDIR  where the three binaries are written
# The chroot must already have `apt-get build-dep containerd` (Go 1.19 and the -dev
# packages). aufs is not packaged in Debian's gocode, hence no_aufs; btrfs needs cgo.
set -eu
if [ $# -ne 2 ]; then
    echo "usage: $0 DSC OUTDIR" >&2
    exit 2
fi
DSC=$1
OUT=$2
WORK=$(mktemp -d /var/tmp/apull-containerd.XXXXXX)
PKG=github.com/containerd/containerd
trap 'rm -rf "$WORK"' EXIT

dpkg-source --no-check -x "$DSC" "$WORK/src" >/dev/null   # applies debian/patches
cd "$WORK/src"
VERSION=$(dpkg-parsechangelog -S Version)                  # 1.6.20~ds1-1+deb12u3
UPSTREAM=$(echo "$VERSION" | sed -e 's/-[^-]*$//' -e 's/~ds[0-9]*$//')   # 1.6.20
mkdir -p "$WORK/gopath/src/github.com/containerd"
ln -s "$WORK/src" "$WORK/gopath/src/$PKG"

export GOPATH="$WORK/gopath:/usr/share/gocode" GO111MODULE=off GOPROXY=off GOFLAGS=
export GOCACHE="$WORK/gocache" CGO_ENABLED=0
TAGS="osusergo netgo static_build no_btrfs no_aufs no_devmapper no_zfs"
LDFLAGS="-s -w -X $PKG/version.Version=$UPSTREAM -X $PKG/version.Revision=$VERSION"
LDFLAGS="$LDFLAGS -X $PKG/version.Package=$PKG"
cd "$WORK/gopath/src/$PKG"
mkdir -p "$OUT"
for cmd in containerd containerd-shim-runc-v2 ctr; do
    go build -trimpath -tags "$TAGS" -ldflags "$LDFLAGS" -o "$OUT/$cmd.tmp" "./cmd/$cmd"
    mv "$OUT/$cmd.tmp" "$OUT/$cmd"
done
"$OUT/containerd" --version
