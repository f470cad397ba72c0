#!/usr/bin/env bash
# A lab volume group on a loop-backed file, for trying `kennel driver
# --backend lvm` on a laptop or lab node (run as root).
#
#   hack/lab-vg.sh up   [--size 10G] [--name kennel-lab] [--dir /var/lib/kennel-lab] [--thin-pool SIZE]
#   hack/lab-vg.sh down [--name kennel-lab] [--dir /var/lib/kennel-lab]
#
# `up` is idempotent and prints the driver flags to use; `down` removes every
# LV of the VG, the VG, the PV label, the loop device and the file.
# Without device-mapper in the kernel lvm2 runs with
# `--driverloaded n`: metadata only, no thin pool.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

action=${1:-}; shift || true
size=10G name=kennel-lab dir=/var/lib/kennel-lab thin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --size) size=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --thin-pool) thin=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
case "$name" in
  ''|-*|*[!A-Za-z0-9+_.-]*) echo "invalid VG name: $name" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
command -v lvm >/dev/null || { echo "lvm2 is not installed (hack/setup.sh installs it)" >&2; exit 1; }

export LVM_SUPPRESS_FD_WARNINGS=1
lvm_opts=()
dm=yes
dmsetup version >/dev/null 2>&1 || dm=no
if [ "$dm" = no ]; then
  lvm_opts+=(--driverloaded n)
fi
if [ ! -e /run/udev/control ] || [ "$dm" = no ]; then
  lvm_opts+=("--config=activation{udev_sync=0 udev_rules=0 monitoring=0} devices{obtain_device_list_from_udev=0}")
fi
image="$dir/$name.img"

backing_loop() {
  losetup -j "$image" -O NAME --noheadings 2>/dev/null | head -n1 | tr -d ' '
}

up() {
  mkdir -p "$dir"
  [ -f "$image" ] || truncate -s "$size" "$image"
  local dev
  dev=$(backing_loop)
  [ -n "$dev" ] || dev=$(losetup -f --show "$image")
  if ! vgs "${lvm_opts[@]}" "$name" >/dev/null 2>&1; then
    pvcreate "${lvm_opts[@]}" -y "$dev" >/dev/null
    vgcreate "${lvm_opts[@]}" "$name" "$dev" >/dev/null
  fi
  if [ -n "$thin" ] && ! lvs "${lvm_opts[@]}" "$name/pool" >/dev/null 2>&1; then
    if [ "$dm" = yes ]; then
      lvcreate "${lvm_opts[@]}" -y --type thin-pool -L "$thin" -n pool "$name" >/dev/null
    else
      echo "note: no device-mapper here, so no thin pool" >&2
    fi
  fi
  vgs "${lvm_opts[@]}" "$name" 2>/dev/null
  echo
  echo "volume group $name on $dev ($image)"
  echo "driver flags: --backend lvm --volume-group $name"
  [ -z "$thin" ] || echo "thin StorageClass parameters: type: thin, thinPool: pool"
}

down() {
  if vgs "${lvm_opts[@]}" "$name" >/dev/null 2>&1; then
    local pvs_of
    pvs_of=$(pvs "${lvm_opts[@]}" --noheadings -o pv_name -S "vg_name=$name" 2>/dev/null | tr -d ' ')
    if [ "$dm" = yes ]; then
      vgchange "${lvm_opts[@]}" -an "$name" >/dev/null 2>&1 || true
    fi
    vgremove "${lvm_opts[@]}" -ff -y "$name" >/dev/null
    for pv in $pvs_of; do
      pvremove "${lvm_opts[@]}" -y "$pv" >/dev/null 2>&1 || true
    done
  fi
  local dev
  while dev=$(backing_loop) && [ -n "$dev" ]; do
    losetup -d "$dev"
  done
  rm -f "$image"
  rmdir "$dir" 2>/dev/null || true
  echo "volume group $name removed"
}

case "$action" in
  up) up ;;
  down) down ;;
  *) usage ;;
esac
