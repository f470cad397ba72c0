#!/usr/bin/env bash
# Install what the one-node cluster tests need besides the Kubernetes binaries (those come from
# KENNEL_K8S_BIN, see README "Running the cluster tests"): etcd, containerd, runc, the CNI
# plugins, a static busybox for the test image, zstd for the compressed binaries, and buildah,
# debootstrap and strip for Kennel's own image (hack/image.sh).
# The harness runs its own etcd and containerd on its own sockets, ports and directories, so the
# packages' system services are kept from starting during the install and never used.
set -euo pipefail

packages=(etcd-server containerd runc containernetworking-plugins busybox-static zstd openssl iproute2
  buildah debootstrap binutils)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  # Keep maintainer scripts from starting etcd or containerd on their default sockets.
  policy=/usr/sbin/policy-rc.d
  added_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  trap 'if [ -n "$added_policy" ]; then rm -f "$policy"; fi' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Where no policy-rc.d existed before the packages did, their services may be running: the
# tests never use them, but a host etcd on :2379 or containerd on its default socket would only
# confuse a reader of `ps`. Stop them when this script finds them started by the package.
for svc in etcd containerd; do
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl is-active --quiet "$svc" 2>/dev/null && systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done

for tool in etcd containerd ctr runc zstd busybox kubectl buildah debootstrap strip; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (kubectl is not packaged in Debian: install it from https://kubernetes.io/docs/tasks/tools/)" >&2; exit 1; }
done
for plugin in bridge host-local loopback portmap; do
  [ -x "/usr/lib/cni/$plugin" ] || { echo "error: CNI plugin /usr/lib/cni/$plugin missing" >&2; exit 1; }
done
echo "kennel: cluster test tools ready"
