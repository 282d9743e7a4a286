"""Thin Prefect tasks around infra.tracking (MLflow). Retries: these talk to a tracking server."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from infra.tracking import Tracker
from kdnas_core.config import config_from_dict
from kdnas_core.latency import count_flops
from kdnas_core.search_space import StudentArch

RETRY = dict(retries=2, retry_delay_seconds=5)


@task(name="track-search", **RETRY)
def start_search_run(cfg: dict, search_key: str, teacher_ms: float, info: dict, parent_run_id: str | None) -> str:
    """The search's parent run; a resumed search keeps logging to the run it started."""
    tracker = Tracker(config_from_dict(cfg))
    return parent_run_id or tracker.start_search(search_key, teacher_ms, info)


@task(name="track-candidate", **RETRY)
def log_candidate(cfg: dict, parent_run_id: str, obs: dict, latency_report: dict | None,
                  loss_curve: list | None) -> str:
    c = config_from_dict(cfg)
    arch = StudentArch.from_name(obs["arch"])
    b, s = c.latency.grid[0]
    obs = {**obs, "arch_dict": arch.to_dict(), "flops_g": count_flops(arch, b, s)["total"] / 1e9,
           "params_m": obs.get("extra", {}).get("params_m")}
    losses = [loss for _, loss in loss_curve] if loss_curve else None
    return Tracker(c).log_candidate(parent_run_id, obs, latency_report, losses)


@task(name="track-results", **RETRY)
def log_search_results(cfg: dict, parent_run_id: str, out_dir: str) -> None:
    Tracker(config_from_dict(cfg)).log_search_results(parent_run_id, Path(out_dir))


@task(name="register-student", **RETRY)
def register_student(cfg: dict, parent_run_id: str, student_dir: str, budgets: list[str], metrics: dict) -> dict:
    return Tracker(config_from_dict(cfg)).register_student(parent_run_id, Path(student_dir), budgets, metrics)


@task(name="track-finish", **RETRY)
def finish_search_run(cfg: dict, parent_run_id: str) -> None:
    Tracker(config_from_dict(cfg)).finish(parent_run_id)


@task(name="track-sync-candidates", **RETRY)
def sync_candidates(cfg: dict, parent_run_id: str, state_path: str) -> int:
    """Log every observation of the search state that has no run yet (a tracking outage during
    the search, or a crash between saving a result and logging it); returns how many."""
    c = config_from_dict(cfg)
    tracker = Tracker(c)
    path = Path(state_path)
    if not path.is_file():
        return 0
    known = tracker.logged_candidates(parent_run_id)
    missing = [o for o in json.loads(path.read_text())["observations"] if o["arch_id"] not in known]
    b, s = c.latency.grid[0]
    for obs in missing:
        arch = StudentArch.from_name(obs["arch"])
        obs = {**obs, "arch_dict": arch.to_dict(), "flops_g": count_flops(arch, b, s)["total"] / 1e9,
               "params_m": obs.get("extra", {}).get("params_m")}
        tracker.log_candidate(parent_run_id, obs)
    return len(missing)


@task(name="track-flush-spool")
def flush_spool(cfg: dict, wait_s: float) -> dict:
    """Upload artifacts spooled during an artifact-store outage, retrying with backoff for up to
    ``wait_s`` seconds; returns what was uploaded, what still waits, and the delay."""
    tracker = Tracker(config_from_dict(cfg))
    start, delay, total = time.monotonic(), 5.0, {"uploaded": 0, "pending": len(tracker.spooled())}
    if not total["pending"]:
        return {**total, "waited_s": 0.0}
    logger = get_run_logger()
    while True:
        r = tracker.flush_spool()
        total = {"uploaded": total["uploaded"] + r["uploaded"], "pending": r["pending"]}
        waited = time.monotonic() - start
        if not r["pending"] or waited >= wait_s:
            break
        logger.warning("artifact store unavailable: %d artifacts spooled in %s (oldest %.0f s); retrying in %.0f s",
                       r["pending"], tracker.spool, r["oldest_pending_s"], delay)
        time.sleep(min(delay, max(0.0, wait_s - waited)))
        delay = min(delay * 2, 60.0)
    return {**total, "waited_s": round(time.monotonic() - start, 1), "spool": str(tracker.spool)}
