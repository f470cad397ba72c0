#!/usr/bin/env bash
# Python grpcio in a venv under target/, for the test that drives the driver from a C-core gRPC
# client (tests/grpc_clients.rs). Idempotent; run from hack/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/pyvenv
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p target
  python3 -m venv "$venv" 2>/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$venv"
  }
fi
if ! "$venv/bin/python" -c 'import grpc' 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'grpcio~=1.85.0'
fi
echo "kennel: python grpcio $("$venv/bin/python" -c 'import grpc; print(grpc.__version__)') in $venv"
