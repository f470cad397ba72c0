# syntax=docker/dockerfile:1
# Build: docker build -t kennel:0.1.0 .
# One image for every subcommand: the node DaemonSet runs `kennel driver`, the retention
# Deployment runs `kennel retention` (as a non-root user set in its manifest).

# build.rs compiles proto/csi.proto with a pure-Rust compiler: no protoc needed.
FROM rust:1.95-slim-trixie AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kennel \
 && install -m 0755 target/release/kennel /usr/local/bin/kennel

FROM debian:trixie-slim
# The host tools the code runs (tests/dockerfile.rs finds them in src/ and checks this list):
# filesystems (mkfs, fsck, resize, blkid probe), lvm2 for the LVM backend, and the tools
# `kennel bench` times as its baseline (losetup, mount, umount, rm). lvm2 runs helpers of
# its own (tests/dockerfile.rs reads them from lvm2's configuration): thin_check,
# thin_repair and thin_dump (thin-provisioning-tools, only recommended by lvm2, so not
# pulled in here) whenever it activates or repairs a thin pool, and dmeventd to monitor it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      e2fsprogs \
      xfsprogs \
      lvm2 \
      thin-provisioning-tools \
      dmeventd \
      util-linux \
      mount \
      coreutils \
 && rm -rf /var/lib/apt/lists/*
# Inside a container lvm2 must not wait for udev, and must find the host's devices.
RUN sed -i -e 's/^\(\s*\)# udev_sync = 1/\1udev_sync = 0/' \
           -e 's/^\(\s*\)# udev_rules = 1/\1udev_rules = 0/' /etc/lvm/lvm.conf || true
COPY --from=build /usr/local/bin/kennel /usr/local/bin/kennel
ENTRYPOINT ["/usr/local/bin/kennel"]
CMD ["--help"]
