#!/usr/bin/env bash
# An MLflow tracking server on 127.0.0.1: SQLite backend under .mlflow/, artifacts in S3
# (MLFLOW_S3_ENDPOINT_URL for a non-AWS endpoint, e.g. infra/s3-server.sh). One worker and no
# job execution: it fits a small box (~500 MB).
#   infra/mlflow-server.sh start|stop
set -euo pipefail
source "$(dirname "$0")/env.sh"
pidfile="$RUN_DIR/mlflow.pid"
export KDNAS_MLFLOW_PORT="${KDNAS_MLFLOW_PORT:-5000}" KDNAS_BUCKET="${KDNAS_BUCKET:-kdnas}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
store="${KDNAS_MLFLOW_DIR:-$KDNAS_REPO/.mlflow}"

case "${1:-}" in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "mlflow server already running"; exit 0; fi
    mkdir -p "$store"
    mlflow server --backend-store-uri "sqlite:///$store/mlflow.db" \
      --artifacts-destination "s3://$KDNAS_BUCKET/mlflow" \
      --host 127.0.0.1 --port "$KDNAS_MLFLOW_PORT" --workers 1 > "$RUN_DIR/mlflow.log" 2>&1 &
    echo $! > "$pidfile"
    wait_healthy "http://127.0.0.1:$KDNAS_MLFLOW_PORT/health" "$pidfile" "mlflow server" "$RUN_DIR/mlflow.log" 120
    echo "mlflow server up at http://127.0.0.1:$KDNAS_MLFLOW_PORT (artifacts: s3://$KDNAS_BUCKET/mlflow)" ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile"); pkill -TERM -P "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true
      rm -f "$pidfile"; echo "mlflow server stopped"
    fi ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
