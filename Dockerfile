# syntax=docker/dockerfile:1
# Build: docker build -t localhost/kennel:0.1.0 .
# One image for every subcommand: the node DaemonSet runs `kennel driver`, the retention
# Deployment runs `kennel retention` (as a non-root user set in its manifest).
# hack/image.sh builds this same file without a registry (buildah, a Debian base made by
# debootstrap) from a binary built outside: --build-arg KENNEL_BINARY_FROM=prebuilt.

# Where the binary comes from: `build` (compiled here) or `prebuilt` (KENNEL_BINARY in the
# build context).
ARG KENNEL_BINARY_FROM=build

# build.rs compiles proto/*.proto with a pure-Rust compiler: no protoc needed. The `dist`
# profile (Cargo.toml) is fully optimised: fat LTO, one codegen unit.
FROM rust:1.95-slim-trixie AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin kennel \
 && install -m 0755 target/dist/kennel /usr/local/bin/kennel

FROM scratch AS prebuilt
ARG KENNEL_BINARY=kennel
COPY ${KENNEL_BINARY} /usr/local/bin/kennel

FROM ${KENNEL_BINARY_FROM} AS binary

FROM debian:trixie-slim
# The host tools the code runs (tests/dockerfile.rs finds them in src/ and checks this list):
# filesystems (mkfs, fsck, resize, blkid probe), lvm2 for the LVM backend, and the tools
# `kennel bench` times as its baseline (losetup, mount, umount, rm). lvm2 runs helpers of
# its own (tests/dockerfile.rs reads them from lvm2's configuration): thin_check,
# thin_repair and thin_dump (thin-provisioning-tools, only recommended by lvm2, so not
# pulled in here) whenever it activates or repairs a thin pool, and dmeventd to monitor it.
# lvm2's install script backs up every volume group it can see (vgcfgbackup): in a build
# that is the build host's disks, and a busy one can stall the build. A throwaway
# configuration shows it none.
RUN mkdir /tmp/lvm-install \
 && echo 'devices { global_filter = [ "r|.*|" ] }' >/tmp/lvm-install/lvm.conf \
 && apt-get update \
 && LVM_SYSTEM_DIR=/tmp/lvm-install apt-get install -y --no-install-recommends \
      e2fsprogs \
      xfsprogs \
      lvm2 \
      thin-provisioning-tools \
      dmeventd \
      util-linux \
      mount \
      coreutils \
 && rm -rf /var/lib/apt/lists/* /tmp/lvm-install
# Inside a container lvm2 must not wait for udev, and must find the host's devices.
RUN sed -i -e 's/^\(\s*\)# udev_sync = 1/\1udev_sync = 0/' \
           -e 's/^\(\s*\)# udev_rules = 1/\1udev_rules = 0/' /etc/lvm/lvm.conf || true
COPY --from=binary /usr/local/bin/kennel /usr/local/bin/kennel
ENTRYPOINT ["/usr/local/bin/kennel"]
CMD ["--help"]
