#!/usr/bin/env bash
# Run a program inside the VM lane's guest (a kernel with device-mapper) and
# exit with its status.
#
#   hack/vm/run.sh [-t SECONDS] [-e NAME=VALUE]... [-p FILE]... [-o DIR] -- PROGRAM [ARG]...
#
# PROGRAM and every FILE are copied in and appear in the guest at the same
# absolute path as on the host (so a test binary finds the `kennel` binary
# cargo compiled into it); PROGRAM runs as root in the repository directory,
# with a fresh sparse scratch disk as TMPDIR. The guest's console streams to
# stdout; with -o, DIR receives `log` (the program's output) and `status`.
# The guest always powers off; after SECONDS (default 600) QEMU is killed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)

timeout_secs=600
envs=() files=() out_dir=
while [ $# -gt 0 ]; do
  case $1 in
    -t) timeout_secs=$2; shift 2 ;;
    -e) envs+=("$2"); shift 2 ;;
    -p) files+=("$2"); shift 2 ;;
    -o) out_dir=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [-t SECONDS] [-e NAME=VALUE]... [-p FILE]... [-o DIR] -- PROGRAM [ARG]..." >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "error: no program given" >&2; exit 2; }

"$repo/hack/vm/build-guest.sh"
guest=$repo/target/vm/guest

work=$(mktemp -d "$repo/target/vm/run.XXXXXX")
qemu_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill -9 "$qemu_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# The payload: files under files/<absolute path>, and the script the guest runs.
payload=$work/disk/payload
mkdir -p "$payload/files"
script=$payload/run
echo "set -e" >"$script"
program=$1
shift
if [ -f "$program" ]; then
  files+=("$program")
  program=$(realpath "$program")
fi
for f in "${files[@]}"; do
  abs=$(realpath "$f")
  mkdir -p "$payload/files$(dirname "$abs")"
  # Debug info is most of a debug test binary; the guest does not need it.
  if ! objcopy --strip-debug "$abs" "$payload/files$abs" 2>/dev/null; then
    cp "$abs" "$payload/files$abs"
  fi
  echo "mkdir -p $(quote "$(dirname "$abs")") && ln -sf $(quote "/scratch/payload/files$abs") $(quote "$abs")" >>"$script"
done
echo "mkdir -p $(quote "$repo") && cd $(quote "$repo")" >>"$script"
for e in "${envs[@]}"; do echo "export $(quote "$e")" >>"$script"; done
echo "set +e" >>"$script"
line="exec"
for a in "$program" "$@"; do line+=" $(quote "$a")"; done
echo "$line" >>"$script"

# A fresh sparse scratch disk holding the payload, and an empty results disk.
truncate -s 16G "$work/scratch.img"
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 -d "$work/disk" "$work/scratch.img"
truncate -s 64M "$work/results.img"

accel=${KENNEL_VM_ACCEL:-tcg}
start=$(date +%s)
timeout --kill-after=10 "$timeout_secs" qemu-system-x86_64 \
  -accel "$accel" -cpu "${KENNEL_VM_CPU_MODEL:-qemu64}" -smp "${KENNEL_VM_CPUS:-2}" -m "${KENNEL_VM_MEMORY:-2048}" \
  -nodefaults -display none -no-reboot -serial stdio \
  -kernel "$guest/vmlinuz" -initrd "$guest/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off" \
  -drive "file=$work/scratch.img,format=raw,if=virtio,cache=unsafe" \
  -drive "file=$work/results.img,format=raw,if=virtio,cache=unsafe" \
  </dev/null &
qemu_pid=$!
qemu_status=0
wait "$qemu_pid" || qemu_status=$?
qemu_pid=
echo "kennel-vm: guest ran $(($(date +%s) - start))s"

results=$work/results
mkdir -p "$results"
if ! tar -xf "$work/results.img" -C "$results" 2>/dev/null || [ ! -f "$results/status" ]; then
  if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then
    echo "error: the guest did not finish within ${timeout_secs}s; QEMU was killed" >&2
  else
    echo "error: the guest left no results (QEMU exit status $qemu_status)" >&2
  fi
  exit 125
fi
if [ -n "$out_dir" ]; then
  mkdir -p "$out_dir"
  cp "$results/log" "$results/status" "$out_dir/"
fi
exit "$(cat "$results/status")"
