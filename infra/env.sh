# Sourced by the infra scripts: quiet telemetry, Prefect state inside the repo, the venv's tools.
KDNAS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KDNAS_REPO
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_HOME="${PREFECT_HOME:-$KDNAS_REPO/.prefect}"
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}"
export KDNAS_PREFECT_PORT="${KDNAS_PREFECT_PORT:-4200}"
export PREFECT_API_URL="${PREFECT_API_URL:-http://127.0.0.1:$KDNAS_PREFECT_PORT/api}"
export PATH="$KDNAS_REPO/.venv/bin:$PATH"
RUN_DIR="$PREFECT_HOME/run"
mkdir -p "$RUN_DIR"

# wait_healthy URL PIDFILE NAME LOG SECONDS: poll URL until it answers, or fail if the process dies.
wait_healthy() {
  for _ in $(seq 1 "$5"); do
    curl -fs "$1" > /dev/null 2>&1 && return 0
    kill -0 "$(cat "$2")" 2>/dev/null || { echo "$3 exited; see $4" >&2; return 1; }
    sleep 1
  done
  echo "$3 not healthy after $5 s; see $4" >&2
  return 1
}
