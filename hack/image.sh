#!/usr/bin/env bash
# Build Kennel's image from the Dockerfile without a registry: the Debian base the Dockerfile
# names is made locally with debootstrap (Debian's packages), the Dockerfile is built with
# buildah, and the image is written as a docker-archive and, if asked, imported into a
# containerd. Run as root on Debian/Ubuntu (buildah and debootstrap are installed if missing).
#
#   hack/image.sh                                  # compile in the Dockerfile's build stage
#   hack/image.sh --binary target/debug/kennel     # take a binary built outside (CI)
#   hack/image.sh --binary B --containerd /run/containerd/containerd.sock
#
# Options: --binary PATH (stripped into the build context; the Dockerfile's `prebuilt` stage),
# --tag IMAGE (default localhost/kennel:<Cargo.toml version>), --output FILE (default
# target/image/kennel.tar), --containerd SOCKET (import into its k8s.io namespace).
# The base image is built once and kept in buildah's storage; KENNEL_DEBIAN_MIRROR picks the
# mirror. Prints each step's duration and the image's size.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
tag="localhost/kennel:${version}"
binary=
output=target/image/kennel.tar
containerd=
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    --containerd) containerd=$2; shift 2 ;;
    *) echo "hack/image.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

mirror=${KENNEL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=target/image
mkdir -p "$work"

step_start=$(date +%s)
step() {
  local now
  now=$(date +%s)
  echo "image: $1 ($((now - step_start)) s)"
  step_start=$now
}

missing=()
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  step "installed ${missing[*]}"
fi

# The runtime stage's base, as the Dockerfile names it (its last FROM).
base=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile | tail -n1)
case "$base" in
  debian:*) suite=${base#debian:}; suite=${suite%-slim} ;;
  *) echo "hack/image.sh: the runtime base $base is not a Debian image" >&2; exit 1 ;;
esac
qualified="docker.io/library/${base}"
if ! buildah inspect --type image "$qualified" >/dev/null 2>&1; then
  rootfs="$work/rootfs-${suite}"
  rm -rf "$rootfs"
  debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  # As Debian's own -slim images are made: apt keeps no package cache, dpkg installs no
  # documentation, manuals or translations (copyright files stay).
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CONF
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  step "debootstrap $suite from $mirror"
  tar --numeric-owner -C "$rootfs" -cf "$work/rootfs-${suite}.tar" .
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$work/rootfs-${suite}.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash "$ctr"
  buildah commit --quiet "$ctr" "$qualified" >/dev/null
  buildah rm "$ctr" >/dev/null
  rm -rf "$rootfs" "$work/rootfs-${suite}.tar"
  step "base image $qualified"
fi

# A build that stops making progress fails with its log instead of hanging the caller.
build_timeout=${KENNEL_IMAGE_BUILD_TIMEOUT:-1800}
args=(--pull=never --isolation=chroot --layers=false -f "$PWD/Dockerfile" -t "$tag")
if [ -n "$binary" ]; then
  context="$work/context"
  rm -rf "$context"
  mkdir -p "$context"
  # Only the binary goes into the context; debug info stays out of the image.
  strip -o "$context/kennel" "$binary"
  timeout "$build_timeout" buildah build "${args[@]}" --build-arg KENNEL_BINARY_FROM=prebuilt \
    --build-arg KENNEL_BINARY=kennel "$context" >"$work/build.log" 2>&1 ||
    { tail -n 30 "$work/build.log" >&2; exit 1; }
else
  timeout "$build_timeout" buildah build "${args[@]}" . >"$work/build.log" 2>&1 ||
    { tail -n 30 "$work/build.log" >&2; exit 1; }
fi
step "built $tag"

rm -f "$output"
buildah push --quiet "$tag" "docker-archive:${output}:${tag}" >/dev/null
step "wrote $output ($(du -m "$output" | cut -f1) MiB)"

if [ -n "$containerd" ]; then
  ctr --address "$containerd" --namespace k8s.io images import "$output" >/dev/null
  step "imported into $containerd"
fi
