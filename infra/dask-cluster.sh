#!/usr/bin/env bash
# A Dask cluster on this machine: a scheduler and KDNAS_DASK_WORKERS workers on 127.0.0.1, for
# `runner: {kind: dask, address: tcp://127.0.0.1:8786}` and the integration tests. On real
# machines run the same two commands (`dask scheduler`, `dask worker <address>`) on each host,
# or see infra/k8s/dask-cluster.yaml. Workers need the kdnas package and the Prefect, MLflow and
# S3 settings (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_*) in their environment.
#   infra/dask-cluster.sh start|stop|status
#   KDNAS_DASK_RESOURCES="GPU=1" declares one GPU per worker (one candidate per GPU).
set -euo pipefail
source "$(dirname "$0")/env.sh"
export KDNAS_DASK_PORT="${KDNAS_DASK_PORT:-8786}" KDNAS_DASK_WORKERS="${KDNAS_DASK_WORKERS:-2}"
address="tcp://127.0.0.1:$KDNAS_DASK_PORT"
# Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in every worker, which switches off glibc's adaptive
# mmap threshold: each large tensor is then mmapped afresh and a proxy distillation takes twice
# as long (measured, infra/dask_runner.py). A fixed 32 MiB mmap threshold gets that back.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-33554432}"
pids="$RUN_DIR/dask-$KDNAS_DASK_PORT.pids"

workers_up() {
  python - "$address" "$1" <<'PY'
import sys
from distributed import Client
with Client(sys.argv[1], timeout="10s") as c:
    c.wait_for_workers(int(sys.argv[2]), timeout=120)
    print(f"dask cluster up at {sys.argv[1]}: {len(c.scheduler_info()['workers'])} workers")
PY
}

case "${1:-}" in
  start)
    if [ -f "$pids" ]; then echo "dask cluster already running at $address (stop it first)"; exit 0; fi
    dask scheduler --host 127.0.0.1 --port "$KDNAS_DASK_PORT" --no-dashboard --no-show \
      > "$RUN_DIR/dask-scheduler-$KDNAS_DASK_PORT.log" 2>&1 &
    echo $! > "$pids"
    resources=()
    [ -n "${KDNAS_DASK_RESOURCES:-}" ] && resources=(--resources "$KDNAS_DASK_RESOURCES")
    for i in $(seq 1 "$KDNAS_DASK_WORKERS"); do
      # One thread per worker: a candidate's torch uses the worker's cores, one candidate at a time.
      dask worker "$address" --host 127.0.0.1 --nthreads 1 --nworkers 1 --name "kdnas-worker-$i" \
        --no-dashboard "${resources[@]}" > "$RUN_DIR/dask-worker-$KDNAS_DASK_PORT-$i.log" 2>&1 &
      echo $! >> "$pids"
    done
    workers_up "$KDNAS_DASK_WORKERS" || { "$0" stop; exit 1; } ;;
  stop)
    if [ -f "$pids" ]; then
      # workers first (their nannies stop the worker processes), then the scheduler
      tac "$pids" | while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done
      for _ in $(seq 1 20); do
        alive=0; while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$pids"
        [ "$alive" = 0 ] && break; sleep 0.5
      done
      while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < "$pids"
      rm -f "$pids"; echo "dask cluster stopped"
    fi ;;
  status)
    [ -f "$pids" ] && workers_up 1 || { echo "no dask cluster at $address"; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
