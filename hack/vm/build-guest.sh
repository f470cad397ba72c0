#!/usr/bin/env bash
# Build the VM lane's guest once: a Debian cloud kernel and an initramfs with
# busybox, the host's lvm2/e2fsprogs/xfsprogs/util-linux binaries and their
# libraries, thin-provisioning-tools, and the device-mapper, loop, virtio and
# xfs modules. Output: target/vm/guest/{vmlinuz,initrd.gz}; rebuilt only when
# this script, hack/vm/init or the downloaded packages change.
# Needs hack/setup-vm.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/../.."

debs=target/vm/debs
out=target/vm/guest
kernel_pkg=$(cat "$debs/kernel-package" 2>/dev/null) || {
  echo "error: run hack/setup-vm.sh first" >&2
  exit 1
}
kernel_deb=$(ls "$debs/${kernel_pkg}"_*.deb)
thin_deb=$(ls "$debs"/thin-provisioning-tools_*.deb)

# Host programs the driver and the tests run, besides busybox's applets.
programs=(
  lvm dmsetup
  mke2fs mkfs.ext4 e2fsck fsck.ext4 resize2fs tune2fs dumpe2fs
  mkfs.xfs xfs_growfs xfs_repair xfs_admin xfs_db xfs_info
  losetup mount umount blkid findmnt wipefs lsblk blockdev fsfreeze
  truncate dd sync stat dash
)
# lvm2 tools are symlinks to lvm.
lvm_tools=(pvcreate pvremove pvs pvscan vgcreate vgremove vgs vgchange vgscan
  vgextend vgreduce lvcreate lvremove lvs lvchange lvextend lvresize lvrename
  lvconvert lvdisplay vgdisplay pvdisplay)
modules=(virtio_pci virtio_blk loop dm_mod dm_thin_pool dm_snapshot xfs)

stamp=$( (cat "$0" hack/vm/init; echo "$kernel_deb $thin_deb"; lvm version 2>/dev/null | head -2) | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initrd.gz" ]; then
  exit 0
fi
echo "building the VM guest in $out"

work=$(mktemp -d target/vm/build.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc/lvm,proc,sys,dev,run,tmp,mnt,scratch,results}

dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$thin_deb" "$work/thin"
version=$(ls "$work/kernel/lib/modules")
cp "$work/kernel/boot/vmlinuz-$version" "$work/vmlinuz"

# Modules: what we load plus their dependencies, with a matching modules.dep.
busybox depmod -b "$work/kernel" "$version"
moddir=lib/modules/$version
mkdir -p "$root/$moddir"
declare -A wanted=()
for m in "${modules[@]}"; do
  pattern="/${m//_/[_-]}\.ko[^:]*:"
  line=$(grep -E "$pattern" "$work/kernel/$moddir/modules.dep") || {
    echo "error: module $m not in $kernel_pkg" >&2
    exit 1
  }
  for f in ${line//:/}; do wanted[$f]=1; done
done
for f in "${!wanted[@]}"; do
  mkdir -p "$root/$moddir/$(dirname "$f")"
  cp "$work/kernel/$moddir/$f" "$root/$moddir/$f"
  grep -E "^$f:" "$work/kernel/$moddir/modules.dep" >>"$root/$moddir/modules.dep"
done

# busybox first, so host binaries (in usr/) take precedence on PATH.
cp "$(command -v busybox)" "$root/bin/busybox"

copy_with_libs() {
  local file=$1 dest=$2
  mkdir -p "$root/$(dirname "$dest")"
  cp -L "$file" "$root/$dest"
  # Scripts (xfs_admin) have no libraries.
  ldd "$file" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
    [ -e "$root$lib" ] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
  done || true
}
for p in "${programs[@]}"; do
  path=$(command -v "$p") || { echo "error: $p is not installed (run hack/setup.sh)" >&2; exit 1; }
  copy_with_libs "$path" "usr/sbin/$p"
done
for t in "${lvm_tools[@]}"; do ln -sf lvm "$root/usr/sbin/$t"; done
# busybox's shell prefers its own applets to PATH; scripts run by dash find
# the host's tools (util-linux losetup, not busybox's).
ln -sf dash "$root/usr/sbin/sh"
copy_with_libs "$work/thin/usr/sbin/pdata_tools" usr/sbin/pdata_tools
for t in thin_check thin_repair thin_dump thin_restore; do ln -sf pdata_tools "$root/usr/sbin/$t"; done
# Test binaries use the same loader and libc; keep both reachable by their usual paths.
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
for lib in libgcc_s.so.1 libm.so.6 libc.so.6 libdl.so.2 libpthread.so.0 librt.so.1; do
  src=/lib/x86_64-linux-gnu/$lib
  [ -e "$src" ] && [ ! -e "$root$src" ] && { mkdir -p "$root/lib/x86_64-linux-gnu"; cp -L "$src" "$root$src"; }
done

# No udev in the guest: lvm2 creates device nodes itself and never waits for udev.
cat >"$root/etc/lvm/lvm.conf" <<'CONF'
devices {
  use_devicesfile = 0
  obtain_device_list_from_udev = 0
}
activation {
  udev_sync = 0
  udev_rules = 0
  monitoring = 0
}
global {
  thin_check_executable = "/usr/sbin/thin_check"
}
CONF
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
touch "$root/etc/fstab"
ln -sf /proc/self/mounts "$root/etc/mtab"
cp hack/vm/init "$root/init"
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 >"$work/initrd.gz"
mkdir -p "$out"
mv "$work/vmlinuz" "$work/initrd.gz" "$out/"
echo "$stamp" >"$out/stamp"
echo "VM guest ready: $version, initramfs $(du -h "$out/initrd.gz" | cut -f1)"
