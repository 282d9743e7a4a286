#!/usr/bin/env bash
# Server mode: create the process work pool, deploy kdnas/search from infra/prefect.yaml and
# start a worker. Needs a running server (infra/prefect-server.sh start).
#   infra/deploy.sh [start-worker|stop-worker]
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$KDNAS_REPO"
pidfile="$RUN_DIR/worker.pid"

stop_worker() {
  if [ -f "$pidfile" ]; then
    # The Prefect worker shuts down on SIGINT, not SIGTERM.
    kill -INT "$(cat "$pidfile")" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"; echo "worker stopped"
  fi
}

start_worker() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "worker already running"; return; fi
  prefect worker start --pool kdnas --type process > "$RUN_DIR/worker.log" 2>&1 &
  echo $! > "$pidfile"
  echo "worker started (log: $RUN_DIR/worker.log)"
}

case "${1:-deploy}" in
  stop-worker) stop_worker ;;
  start-worker) start_worker ;;
  deploy)
    prefect work-pool inspect kdnas > /dev/null 2>&1 || prefect work-pool create kdnas --type process
    prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml
    start_worker ;;
  *) echo "usage: $0 [deploy|start-worker|stop-worker]" >&2; exit 2 ;;
esac
