"""Shared by the benchmarks: every report is printed and kept under runs/bench/."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def flow_bench_env() -> None:
    """Settings of the benchmarks that time the Prefect flow; called before prefect is imported.
    Every task really runs: a cache hit would make a variant look cheaper than it is."""
    for key, value in {"DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "TQDM_DISABLE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                       "PREFECT_HOME": str(ROOT / ".prefect")}.items():
        os.environ.setdefault(key, value)
    os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"


def publish(name: str, report: str) -> Path:
    print(report)
    out = ROOT / "runs" / "bench" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return out


def short_commit() -> str:
    """The checkout a report was made from (uncommitted changes are not in it)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
