#!/bin/bash
# Build EROFS and cachefiles with on-demand (fscache) loading, plus our fs_ctl gate, for a
# Debian bookworm node kernel that was built without them.
#
# Usage (as root, INSIDE the build chroot):
#   build-ondemand-modules.sh ABI SOURCE_VERSION OUTDIR FS_CTL_SRC_DIR
#     ABI             the node's kernel ABI, e.g. 6.1.0-50-amd64 (never `uname -r`: in a
#                     chroot that is the host's kernel)
#     SOURCE_VERSION  the Debian version of the node's linux-image-$ABI, e.g. 6.1.176-1;
#                     linux-source-6.1 must be installed at exactly that version
#     OUTDIR          where cachefiles.ko, erofs.ko and fs_ctl.ko are copied
#     FS_CTL_SRC_DIR  directory holding fs_ctl.c and Kbuild
#
# The chroot must already have (apt-get install --no-install-recommends):
#   build-essential xz-utils kmod linux-headers-$ABI linux-source-6.1=$SOURCE_VERSION
# linux-headers-$ABI brings gcc-12 (via linux-compiler-gcc-12-x86) and linux-kbuild-6.1
# (prebuilt fixdep/modpost/objtool). bc, flex, bison and libelf-dev are not needed for
# external modules.
#
# Only fs/cachefiles and fs/erofs are taken from the source tree: in 6.1 they include
# nothing but their own local headers and include/, which the headers package provides
# (and no header outside them depends on the ON-DEMAND options, so the rebuilt modules
# stay compatible with Debian's own fscache.ko and netfs.ko). The options are passed both
# as make variables (they select ondemand.o / fscache.o in the Makefiles) and as -D
# flags (the headers' autoconf.h says they are off); every other option (EROFS_FS_ZIP,
# XATTR, ...) is left as Debian configured it.
set -euo pipefail

if [[ $# -ne 4 ]]; then
    echo "usage: $0 ABI SOURCE_VERSION OUTDIR FS_CTL_SRC_DIR" >&2
    exit 2
fi
abi=$1
source_version=$2
outdir=$3
fs_ctl_src=$4

say() { echo "==> [build-ondemand-modules] $*"; }

kdir=/lib/modules/$abi/build
tarball=/usr/src/linux-source-6.1.tar.xz
[[ -d $kdir ]] || { echo "no kernel headers at $kdir (install linux-headers-$abi)" >&2; exit 1; }
[[ -f $tarball ]] || { echo "no $tarball (install linux-source-6.1=$source_version)" >&2; exit 1; }
installed=$(dpkg-query -W -f '${Version}' linux-source-6.1)
if [[ $installed != "$source_version" ]]; then
    echo "linux-source-6.1 is $installed, the node kernel is $source_version" >&2
    exit 1
fi
for opt in CONFIG_FSCACHE CONFIG_CACHEFILES CONFIG_EROFS_FS; do
    grep -q "^$opt=[my]$" "$kdir/.config" || { echo "$kdir/.config lacks $opt=m|y" >&2; exit 1; }
done

work=/var/tmp/apull-ondemand-build/$abi
say "ABI $abi, linux-source-6.1 $source_version, work dir $work"
rm -rf "$work"
mkdir -p "$work" "$outdir"

say "unpacking fs/cachefiles and fs/erofs from $tarball"
tar -xJf "$tarball" -C "$work" --strip-components=1 \
    linux-source-6.1/fs/cachefiles linux-source-6.1/fs/erofs
mkdir -p "$work/fs_ctl"
cp "$fs_ctl_src/fs_ctl.c" "$fs_ctl_src/Kbuild" "$work/fs_ctl/"

ondemand=(
    CONFIG_CACHEFILES_ONDEMAND=y
    CONFIG_EROFS_FS_ONDEMAND=y
    "KCFLAGS=-DCONFIG_CACHEFILES_ONDEMAND=1 -DCONFIG_EROFS_FS_ONDEMAND=1"
)
jobs=$(nproc)
for dir in fs/cachefiles fs/erofs fs_ctl; do
    say "building $dir"
    make -C "$kdir" M="$work/$dir" -j"$jobs" "${ondemand[@]}" modules
done

say "checking and stripping the results"
for ko in fs/cachefiles/cachefiles.ko fs/erofs/erofs.ko fs_ctl/fs_ctl.ko; do
    # Debian ships its modules without debug info too (4 MB -> a few hundred kB).
    strip --strip-debug "$work/$ko"
    vermagic=$(modinfo -F vermagic "$work/$ko")
    if [[ $vermagic != "$abi "* ]]; then
        echo "$ko: vermagic '$vermagic' does not match $abi" >&2
        exit 1
    fi
    cp "$work/$ko" "$outdir/"
    say "$(basename "$ko"): vermagic '$vermagic'"
done
# grep -c reads all of nm's output (grep -q would stop early and fail the pipe).
has_symbol() { nm "$1" | grep -c " T $2\$" >/dev/null; }
has_symbol "$work/fs/cachefiles/cachefiles.ko" cachefiles_ondemand_init_object \
    || { echo "cachefiles.ko has no on-demand support" >&2; exit 1; }
has_symbol "$work/fs/erofs/erofs.ko" erofs_fscache_register_fs \
    || { echo "erofs.ko has no fscache support" >&2; exit 1; }
say "done: cachefiles.ko erofs.ko fs_ctl.ko in $outdir"
