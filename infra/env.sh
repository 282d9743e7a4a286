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
