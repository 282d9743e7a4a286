#!/usr/bin/env bash
# Start, stop or check a local Prefect server (SQLite under $PREFECT_HOME) on 127.0.0.1.
#   infra/prefect-server.sh start|stop|status
set -euo pipefail
source "$(dirname "$0")/env.sh"
pidfile="$RUN_DIR/server.pid"

case "${1:-}" in
  start)
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then echo "prefect server already running"; exit 0; fi
    # The server must not talk to itself through PREFECT_API_URL while it starts.
    env -u PREFECT_API_URL prefect server start --host 127.0.0.1 --port "$KDNAS_PREFECT_PORT" \
      > "$RUN_DIR/server.log" 2>&1 &
    echo $! > "$pidfile"
    wait_healthy "http://127.0.0.1:$KDNAS_PREFECT_PORT/api/health" "$pidfile" "prefect server" "$RUN_DIR/server.log" 120
    echo "prefect server up at http://127.0.0.1:$KDNAS_PREFECT_PORT (log: $RUN_DIR/server.log)" ;;
  stop)
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile"); pkill -TERM -P "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true
      rm -f "$pidfile"; echo "prefect server stopped"
    fi ;;
  status)
    curl -fs "http://127.0.0.1:$KDNAS_PREFECT_PORT/api/health" > /dev/null && echo up || { echo down; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
