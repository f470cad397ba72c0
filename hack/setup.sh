#!/usr/bin/env bash
# Install what Kennel needs on a fresh Debian/Ubuntu machine (run as root):
# the filesystem and LVM tools the node side invokes, and a usable loop driver.
set -euo pipefail

packages=(e2fsprogs xfsprogs util-linux lvm2 mount)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e /dev/loop-control ]; then
  modprobe loop 2>/dev/null || echo "warning: /dev/loop-control is missing and the loop module could not be loaded" >&2
fi

for tool in mkfs.ext4 mkfs.xfs blkid resize2fs e2fsck xfs_growfs lvm; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found after install" >&2; exit 1; }
done
echo "kennel: host tools ready"

# The one-node cluster tests' tools (etcd, containerd, runc, CNI plugins, busybox, zstd).
"$(dirname "$0")/setup-cluster.sh"
# grpcio for the Python client test, in a venv under target/.
"$(dirname "$0")/setup-ops.sh"
# QEMU and a Debian cloud kernel for the device-mapper VM lane (tests/vm_lane.rs).
"$(dirname "$0")/setup-vm.sh"
