"""Running a benchmark as a user does, and checking the header its report starts with."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(module: str, args: list[str], tmp_path: Path, timeout: int = 1200,
              check: bool = True) -> subprocess.CompletedProcess:
    """``python -m bench.<module> <args>`` from the repository root, as a user runs it; Prefect's
    state in ``tmp_path``, no tracking server inherited from the environment. ``check``: it must
    succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, f"bench.{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def check_header(report: Path, module: str, args: list[str]) -> str:
    """The report exists and names its command and its commit (short hash, +dirty if any)."""
    assert report.is_file(), f"no report {report}"
    text = report.read_text()
    assert f"- command: `python -m bench.{module} {' '.join(args)}" in text
    assert re.search(r"^- commit: [0-9a-f]{7,}(\+dirty)?$", text, re.M), text[:600]
    assert "- machine: " in text and "- date: " in text
    return text
