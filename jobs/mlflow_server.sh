#!/usr/bin/env bash
# MLflow tracking server for a cluster, run on the head: the backend store (sqlite, written by this
# one server process only) and the artifacts live on shared storage, and it binds the head's private
# address, so every node reaches it and nothing outside the cluster's network does.
#   bash jobs/mlflow_server.sh                # starts it in the background (if not already up)
#   bash jobs/mlflow_server.sh --foreground   # e.g. as a sidecar container in a KubeRay head pod
# Prints the tracking URI on stdout: cluster.yaml exports it as MLFLOW_TRACKING_URI before
# `ray start --head`, and configs/llama-3.2-3b.yaml reads tracking.uri from there.
# Settings: MLFLOW_ROOT (default /mnt/shared/cai_ray/mlflow), MLFLOW_HOST (default the first
# address of `hostname -I`), MLFLOW_PORT (default 5000).
# Browse it from your machine through SSH only:
#   ssh -i KEY -L 5000:HEAD_PRIVATE_IP:5000 ubuntu@$(ray get-head-ip cluster.yaml)  -> http://127.0.0.1:5000
set -euo pipefail
ROOT=${MLFLOW_ROOT:-/mnt/shared/cai_ray/mlflow}
HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
PORT=${MLFLOW_PORT:-5000}
URI="http://$HOST:$PORT"
mkdir -p "$ROOT/artifacts"
# Without this, stopping the server leaves a job-runner child and shared-memory files behind.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
args=(server --host "$HOST" --port "$PORT" --workers 1
      --backend-store-uri "sqlite:///$ROOT/mlflow.db" --artifacts-destination "$ROOT/artifacts")
if [[ "${1:-}" == "--foreground" ]]; then
  echo "$URI" >&2
  exec mlflow "${args[@]}"
fi
if ! curl -fsS "$URI/health" >/dev/null 2>&1; then
  setsid nohup mlflow "${args[@]}" </dev/null >>"$ROOT/server.log" 2>&1 &
  for _ in $(seq 60); do
    curl -fsS "$URI/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -fsS "$URI/health" >/dev/null || { echo "mlflow server did not start; see $ROOT/server.log" >&2; exit 1; }
fi
echo "$URI"
