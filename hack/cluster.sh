#!/usr/bin/env bash
# Bring up the test suite's one-node cluster (etcd, control plane, containerd, kubelet and
# Kennel's node plugin on the loop backend) and keep it until Enter is pressed, then tear it down
# as the tests do. Run as root after hack/setup.sh. The Kubernetes binaries (v1.36 by default)
# come from KENNEL_K8S_DIR (default: the nearest shared/k8s beside the repository).
#
#   hack/cluster.sh            # hold the cluster; prints the KUBECONFIG to use
#   hack/cluster.sh seed-lvm   # run scenarios of the seed target by name, holding first
set -euo pipefail
cd "$(dirname "$0")/.."
export KENNEL_CLUSTER_HOLD=1 KENNEL_CLUSTER_LOGS=1
export KENNEL_CLUSTER_SCENARIOS="${1:-none}"
exec cargo test --locked --test cluster_seed -- --nocapture
