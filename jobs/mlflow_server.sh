#!/usr/bin/env bash
# MLflow tracking server for a cluster, run on the head: the backend store (sqlite, written by this
# one server process only) and the artifacts live on shared storage, and it binds the head's private
# address, so every node reaches it and nothing outside the cluster's network does.
#   bash jobs/mlflow_server.sh                # starts it in the background (if not already up)
#   bash jobs/mlflow_server.sh --foreground   # e.g. as a sidecar container in a KubeRay head pod
# Prints the tracking URI on stdout: cluster.yaml exports it as MLFLOW_TRACKING_URI before
# `ray start --head`, and configs/llama-3.2-3b.yaml reads tracking.uri from there.
# Settings: MLFLOW_ROOT (default /mnt/shared/cai_ray/mlflow), MLFLOW_HOST (default the first
# address of `hostname -I`), MLFLOW_PORT (default 5000), MLFLOW_AUTH_FILE (below).
# Who gets in: MLflow's own basic-auth app (`--app-name basic-auth`; it needs Flask-WTF, i.e.
# `pip install "mlflow[auth]"`).  The admin user and password come from MLFLOW_AUTH_FILE (default
# /etc/cai-ray/mlflow/credentials: on Kubernetes the mlflow-auth Secret mounted there), written as
# MLflow's client reads ~/.mlflow/credentials:
#   [mlflow]
#   mlflow_tracking_username = admin
#   mlflow_tracking_password = ...
# Clients pass the same pair: that file as ~/.mlflow/credentials, or MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD in the environment of the driver and of every Ray node (jobs/rayjob.yaml
# sets them from the Secret), never in a config or a job's runtime_env.  The password creates the
# admin user when the user store ($MLFLOW_ROOT/auth/basic_auth.db) is new; a later change to the file
# does not rotate it (use MLflow's update-password API).
# Browse it from your machine through SSH only:
#   ssh -i KEY -L 5000:HEAD_PRIVATE_IP:5000 ubuntu@$(ray get-head-ip cluster.yaml)  -> http://127.0.0.1:5000
set -euo pipefail
ROOT=${MLFLOW_ROOT:-/mnt/shared/cai_ray/mlflow}
HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
PORT=${MLFLOW_PORT:-5000}
URI="http://$HOST:$PORT"
AUTH_FILE=${MLFLOW_AUTH_FILE:-/etc/cai-ray/mlflow/credentials}
mkdir -p "$ROOT/artifacts" "$ROOT/auth"
_cred() {  # the value of key $1 in the credentials file: everything after its first '='
  awk -v key="$1" '{ line = $0; sub(/^[ \t]+/, "", line) }
    index(line, key) == 1 { sub(/^[^=]*=[ \t]*/, "", line); sub(/[ \t\r]+$/, "", line); print line; exit }' "$AUTH_FILE"
}
# A Kubernetes Secret may also arrive as MLFLOW_TRACKING_USERNAME/PASSWORD in this container's env.
USER_NAME=${MLFLOW_TRACKING_USERNAME:-}
PASSWORD=${MLFLOW_TRACKING_PASSWORD:-}
if [[ -z "$USER_NAME" || -z "$PASSWORD" ]]; then
  if [[ ! -f "$AUTH_FILE" || ! -r "$AUTH_FILE" ]]; then
    echo "mlflow_server.sh: $AUTH_FILE is not a readable credentials file (set MLFLOW_AUTH_FILE; see the top of this script)" >&2
    exit 1
  fi
  USER_NAME=$(_cred mlflow_tracking_username)
  PASSWORD=$(_cred mlflow_tracking_password)
fi
if [[ -z "$USER_NAME" || -z "$PASSWORD" ]]; then
  echo "mlflow_server.sh: $AUTH_FILE lacks mlflow_tracking_username or mlflow_tracking_password" >&2
  exit 1
fi
cat >"$ROOT/auth/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = sqlite:///$ROOT/auth/basic_auth.db
admin_username = $USER_NAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
export MLFLOW_AUTH_CONFIG_PATH="$ROOT/auth/basic_auth.ini"
# Only the server's own environment holds the password (read once, to create the admin user).
export MLFLOW_AUTH_ADMIN_PASSWORD="$PASSWORD"
# The auth app's CSRF key: made once per store, kept beside it (owner-only) so restarts agree.
if [[ ! -s "$ROOT/auth/secret_key" ]]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ROOT/auth/secret_key")
fi
MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$ROOT/auth/secret_key")
export MLFLOW_FLASK_SERVER_SECRET_KEY
# Without this, stopping the server leaves a job-runner child and shared-memory files behind.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
args=(server --app-name basic-auth --host "$HOST" --port "$PORT" --workers 1
      --backend-store-uri "sqlite:///$ROOT/mlflow.db" --artifacts-destination "$ROOT/artifacts")
if [[ "${1:-}" == "--foreground" ]]; then
  echo "$URI" >&2
  exec mlflow "${args[@]}"
fi
if ! curl -fsS "$URI/health" >/dev/null 2>&1; then
  setsid nohup mlflow "${args[@]}" </dev/null >>"$ROOT/server.log" 2>&1 &
  for _ in $(seq 180); do  # the auth app creates its user store on first start: slow on a busy head
    curl -fsS "$URI/health" >/dev/null 2>&1 && break
    sleep 1
  done
  curl -fsS "$URI/health" >/dev/null || { echo "mlflow server did not start; see $ROOT/server.log" >&2; exit 1; }
fi
echo "$URI"
