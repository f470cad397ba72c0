#!/usr/bin/env bash
# Install and download what the VM test lane needs (run as root; hack/setup.sh
# calls it). The host kernel may lack device-mapper, so the LVM suites run in
# a small QEMU guest with a Debian cloud kernel (see README, "VM test lane").
#
# Installed on the host: qemu-system-x86 (bookworm-backports: the bookworm
# build conflicts with qemu-utils from backports; no recommends, which would
# pull in udev and a systemd upgrade), busybox-static, cpio.
# Downloaded, never installed: the cloud kernel and thin-provisioning-tools,
# unpacked into the guest by hack/vm/build-guest.sh. Downloads are cached in
# target/vm/debs, so a second run does no network I/O.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
debs=target/vm/debs
mkdir -p "$debs"

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
need_update=
backports_source=/etc/apt/sources.list.d/kennel-backports.sources
if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "adding bookworm-backports to apt sources"
  cat >"$backports_source" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  need_update=1
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for pkg in qemu-system-x86 busybox-static cpio; do
  installed "$pkg" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ] || [ -n "$need_update" ]; then
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  release=()
  [ "$codename" = bookworm ] && release=(-t bookworm-backports)
  apt-get install -y -qq --no-install-recommends "${release[@]}" "${missing[@]}" >/dev/null
fi

# The newest cloud kernel the archive offers, and the thin-pool tools.
kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
  awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kernel_pkg" ]; then
  echo "error: no linux-image-cloud-amd64 in the apt sources" >&2
  exit 1
fi
for pkg in "$kernel_pkg" thin-provisioning-tools; do
  if ! ls "$debs/${pkg}"_*.deb >/dev/null 2>&1; then
    echo "downloading $pkg"
    (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
  fi
done
# The guest builder takes the kernel named here.
echo "$kernel_pkg" >"$debs/kernel-package"

for tool in qemu-system-x86_64 cpio busybox; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found after install" >&2; exit 1; }
done
echo "kennel: VM lane tools ready ($kernel_pkg)"
