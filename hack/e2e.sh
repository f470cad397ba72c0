#!/usr/bin/env bash
# End-to-end check on a real cluster (kind or a lab cluster), for people who have one:
# install Kennel from deploy/, run the seed's StatefulSet walk-through (hello.txt written in
# webserver-2 survives scale 3 -> 2 -> 3), then remove everything again.
#
#   hack/e2e.sh                      # loop backend, current kubectl context
#   OVERLAY=lvm hack/e2e.sh          # LVM backend (volume group named in deploy/overlays/lvm)
#   KIND_CLUSTER=kind hack/e2e.sh    # build the image and load it into that kind cluster first
#   KEEP=1 hack/e2e.sh               # leave everything installed for a look around
set -euo pipefail

OVERLAY="${OVERLAY:-loop}"
KIND_CLUSTER="${KIND_CLUSTER:-}"
KEEP="${KEEP:-}"
TIMEOUT="${TIMEOUT:-300s}"
NAMESPACE="${E2E_NAMESPACE:-kennel-e2e}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n1)"
IMAGE="kennel:${VERSION}"

case "$OVERLAY" in
  loop) STORAGE_CLASS=kennel-loop ;;
  lvm) STORAGE_CLASS=kennel-lvm ;;
  *) echo "OVERLAY must be loop or lvm, not $OVERLAY" >&2; exit 2 ;;
esac

log() { printf '\n== %s\n' "$*"; }

kc() { kubectl -n "$NAMESPACE" "$@"; }

cleanup() {
  local status=$?
  if [ -n "$KEEP" ]; then
    log "KEEP set: leaving namespace $NAMESPACE and Kennel installed"
    exit "$status"
  fi
  if [ "$status" -ne 0 ]; then
    log "failed; state for debugging"
    kc get statefulset,pod,pvc -o wide || true
    kubectl -n kennel-system get pods -o wide || true
    kubectl -n kennel-system logs daemonset/kennel-node -c kennel --tail=50 || true
  fi
  log "cleaning up"
  kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait=true --timeout="$TIMEOUT" || true
  kubectl delete -k "$ROOT/deploy/overlays/$OVERLAY" --ignore-not-found --wait=true --timeout="$TIMEOUT" || true
  exit "$status"
}
trap cleanup EXIT

tools=(kubectl)
if [ -n "$KIND_CLUSTER" ]; then tools+=(docker kind); fi
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 1; }
done

if [ -n "$KIND_CLUSTER" ]; then
  log "building $IMAGE and loading it into kind cluster $KIND_CLUSTER"
  docker build -t "$IMAGE" "$ROOT"
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
fi

log "installing Kennel ($OVERLAY backend)"
kubectl apply -k "$ROOT/deploy/overlays/$OVERLAY"
kubectl -n kennel-system rollout status daemonset/kennel-node --timeout="$TIMEOUT"
kubectl -n kennel-system rollout status deployment/kennel-retention --timeout="$TIMEOUT"
kubectl get csidriver kennel.csi.dev
kubectl get storageclass "$STORAGE_CLASS"

log "webserver StatefulSet on $STORAGE_CLASS in namespace $NAMESPACE"
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
sed "s/storageClassName: kennel-lvm/storageClassName: ${STORAGE_CLASS}/" \
  "$ROOT/deploy/examples/webserver-statefulset.yaml" | kc apply -f -
kc rollout status statefulset/webserver --timeout="$TIMEOUT"
kc get pvc

log "writing hello.txt in webserver-2"
kc exec webserver-2 -- sh -c 'echo kennel > /usr/share/nks-mount/hello.txt'
claim_uid="$(kc get pvc www-webserver-2 -o jsonpath='{.metadata.uid}')"

log "scaling 3 -> 2"
kc scale statefulset/webserver --replicas=2
kc wait --for=delete pod/webserver-2 --timeout="$TIMEOUT"
kc get pvc www-webserver-2 >/dev/null || { echo "www-webserver-2 was deleted on scale-down" >&2; exit 1; }

log "scaling 2 -> 3"
kc scale statefulset/webserver --replicas=3
kc rollout status statefulset/webserver --timeout="$TIMEOUT"
kc wait --for=condition=Ready pod/webserver-2 --timeout="$TIMEOUT"

log "reading hello.txt back"
[ "$(kc get pvc www-webserver-2 -o jsonpath='{.metadata.uid}')" = "$claim_uid" ] \
  || { echo "webserver-2 got a new claim" >&2; exit 1; }
content="$(kc exec webserver-2 -- cat /usr/share/nks-mount/hello.txt)"
[ "$content" = "kennel" ] || { echo "hello.txt reads '$content'" >&2; exit 1; }

log "capacity is published"
kubectl get csistoragecapacities -n kennel-system

log "PASS: webserver-2 kept its volume and data across scale 3 -> 2 -> 3"
