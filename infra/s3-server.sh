#!/usr/bin/env bash
# A local S3-compatible endpoint for server mode and integration tests (moto, in memory), with
# the kdnas bucket created. Production points the same settings at AWS S3 or MinIO instead.
#   infra/s3-server.sh start|stop
set -euo pipefail
source "$(dirname "$0")/env.sh"
pidfile="$RUN_DIR/s3.pid"
export KDNAS_S3_PORT="${KDNAS_S3_PORT:-9000}" KDNAS_BUCKET="${KDNAS_BUCKET:-kdnas}"
# Test credentials for the local endpoint only; real deployments use the AWS credential chain.
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-testing}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-testing}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

case "${1:-}" in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "s3 endpoint already running"; exit 0; fi
    moto_server -H 127.0.0.1 -p "$KDNAS_S3_PORT" > "$RUN_DIR/s3.log" 2>&1 &
    echo $! > "$pidfile"
    wait_healthy "http://127.0.0.1:$KDNAS_S3_PORT/" "$pidfile" "s3 endpoint" "$RUN_DIR/s3.log" 60
    (cd "$KDNAS_REPO" && MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$KDNAS_S3_PORT" python -m infra.storage ensure-bucket "$KDNAS_BUCKET")
    echo "s3 endpoint up at http://127.0.0.1:$KDNAS_S3_PORT, bucket $KDNAS_BUCKET" ;;
  stop)
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; echo "s3 endpoint stopped"; fi ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
