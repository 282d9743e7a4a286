"""Thin Prefect tasks around infra.tracking (MLflow). Retries: these talk to a tracking server."""

from __future__ import annotations

from pathlib import Path

from prefect import task

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
