"""Thin Prefect tasks around kdnas_core jobs.

Each task takes the config as a plain dict plus small values, calls one core function and
returns a small JSON-serialisable dict. Proxy distillation and latency profiling are cached
by ``arch_id`` plus a hash of the config sections that affect them, with results persisted as
JSON (never pickle), so re-running a flow does not redo finished candidates.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy

from kdnas_core.config import KDNASConfig, config_from_dict
from kdnas_core.errors import KdnasError
from kdnas_core.search.candidates import (
    EventLog,
    LatencyProfile,
    ProxyEvaluator,
    ProxyResult,
    latency_profile,
    teacher_latency,
)
from kdnas_core.final import export_student, final_student
from kdnas_core.keys import KEYS, key
from kdnas_core.pipeline import EvaluationTable
from kdnas_core.progress import Report, every
from kdnas_core.search.loop import Evaluation
from kdnas_core.search.signals import SignalProbe, zero_cost_screen
from kdnas_core.search.space import StudentArch
from kdnas_core.search.runner import search_dir
from kdnas_core.evaluation.table import evaluate_students, write_evaluation
from kdnas_core.workspace import Workspace

_LOCK = threading.Lock()
_WORKSPACES: dict[str, Workspace] = {}
_EVALUATORS: dict[str, ProxyEvaluator] = {}
_PROBES: dict[str, SignalProbe] = {}
# Seconds between two progress lines of one task run: the Prefect UI shows where a long step
# stands (e.g. "distill: step 120/400, loss 0.41, ETA 1m20s") without a line per batch.
PROGRESS_EVERY_S = 15.0


def run_progress() -> Report:
    """Progress of the current task run's core steps, as lines in its Prefect log."""
    logger = get_run_logger()
    return every(PROGRESS_EVERY_S, logger.info)


def workspace(cfg: KDNASConfig) -> Workspace:
    """One teacher and one set of splits per process and config: tasks on worker threads share
    them instead of reloading the teacher for every candidate."""
    name = key("workspace", cfg)
    with _LOCK:
        if name not in _WORKSPACES:
            ws = Workspace.prepare(cfg).validate()
            if cfg.paths.shared_cache:
                # Dask workers on other machines fetch the teacher states the flow published.
                from infra.storage import S3SharedStates

                ws.shared_states = S3SharedStates(cfg.paths.shared_cache)
            _WORKSPACES[name] = ws
        return _WORKSPACES[name]


def evaluator(cfg: KDNASConfig) -> ProxyEvaluator:
    """One per process and config; the teacher states it builds first are logged to the task
    run that builds them, and each distillation passes its own task run's progress."""
    name = f"{key('workspace', cfg)}-{key('latency', cfg)}"
    ws = workspace(cfg)
    with _LOCK:
        if name not in _EVALUATORS:
            ev = ProxyEvaluator(ws, progress=run_progress(), probe=lambda: probe(cfg))
            ev.progress = False  # later distillations pass their own run's, never this one's
            _EVALUATORS[name] = ev
        return _EVALUATORS[name]


def probe(cfg: KDNASConfig) -> SignalProbe:
    """The quality signals' probe (held-out texts, the teacher's embeddings of them): one per
    process and workspace, shared by the proxy runs and the zero-cost screen."""
    name = key("workspace", cfg)
    ws = workspace(cfg)
    with _LOCK:
        if name not in _PROBES:
            _PROBES[name] = SignalProbe(ws)
        return _PROBES[name]


@dataclass
class ArchCache(CachePolicy):
    """Cache key = task + arch_id + the named key of kdnas_core.keys (the config sections that
    change the result)."""

    key: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str | None:
        cfg = config_from_dict(inputs["cfg"])
        arch = StudentArch.from_name(inputs["arch"])
        return f"{task_ctx.task.name}-{arch.arch_id}-{KEYS[self.key].of(cfg)}"


def evaluation_from(latency: dict | BaseException, proxy: dict | BaseException, quality: str = "hidden") -> Evaluation:
    """A candidate's evaluation from its two task results, ``quality`` (reward.quality) its
    reward's quality term; an exception in either makes it a failed candidate (recorded, never
    recommended)."""
    err = next((x for x in (proxy, latency) if isinstance(x, BaseException)), None)
    if err is not None:
        return Evaluation.failure(err)
    try:
        return ProxyResult.from_dict(proxy).evaluation(LatencyProfile.from_dict(latency).latency_ms, quality,
                                                       worker=proxy["worker"])
    except KdnasError as err:  # the signal is missing from this result: said once per candidate
        return Evaluation.failure(err)


def _arch_run_name(prefix: str):
    def name() -> str:
        from prefect.runtime import task_run

        arch = StudentArch.from_name(task_run.parameters["arch"])
        return f"{prefix}-{arch.arch_id}-{arch.name}"

    return name


@task(name="prepare-teacher-states", retries=0)
def prepare_teacher_states(cfg: dict) -> dict:
    """Check the downstream tasks, then run the teacher once over the proxy and eval texts;
    every candidate reuses the states."""
    c = config_from_dict(cfg)
    workspace(c).check_tasks()  # before any distillation: an unreadable task fails the flow now
    ev = evaluator(c)
    return {"proxy_cache": ev.states.key, "eval_cache": ev.eval_states.key,
            "proxy_texts": len(ev.states.offsets) - 1, "proxy_tokens": ev.states.meta["n_tokens"]}


@task(name="teacher-latency")
def teacher_latency_ms(cfg: dict) -> float:
    c = config_from_dict(cfg)
    b, s = c.latency.reward_shape
    return teacher_latency(workspace(c), progress=run_progress()).median(c.latency.reward_backend, b, s)


@task(name="proxy-distill", cache_policy=ArchCache(key="proxy"), persist_result=True,
      result_serializer="json", task_run_name=_arch_run_name("proxy-distill"))
def proxy_distill(cfg: dict, arch: str) -> dict:
    c = config_from_dict(cfg)
    where = _where()
    if where.startswith("dask:") and c.runner.torch_threads:
        import torch

        torch.set_num_threads(c.runner.torch_threads)  # Dask's nanny pins workers to 1 thread
    return {**evaluator(c).distill(StudentArch.from_name(arch), progress=run_progress()).to_dict(), "worker": where}


def _where() -> str:
    """Which process distilled a candidate: the Dask worker's name, else host and pid."""
    try:
        from distributed import get_worker

        return f"dask:{get_worker().name}"
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


@task(name="screen-candidates", cache_policy=NO_CACHE)
def screen_candidates(cfg: dict, archs: list[str]) -> list[float]:
    """An episode's pool scored zero-cost (search.screen): the quality loss of each candidate as
    cut from the teacher, forward passes only, in this process's workspace."""
    c = config_from_dict(cfg)
    return zero_cost_screen(lambda: probe(c), c.search.screen_signal)([StudentArch.from_name(a) for a in archs])


@task(name="profile-latency", cache_policy=ArchCache(key="latency"), persist_result=True,
      result_serializer="json", task_run_name=_arch_run_name("profile-latency"))
def profile_latency(cfg: dict, arch: str) -> dict:
    c = config_from_dict(cfg)
    return latency_profile(workspace(c), StudentArch.from_name(arch), run_progress()).to_dict()


@task(name="final-distill", cache_policy=NO_CACHE, persist_result=True,
      result_serializer="json", task_run_name=_arch_run_name("final-distill"))
def final_distill(cfg: dict, arch: str) -> dict:
    # Not cached by Prefect: final_student reuses a saved student itself, after checking it
    # against its sha256 manifest (a cached task result would hand out a damaged one).
    c = config_from_dict(cfg)
    return final_student(c, workspace(c), StudentArch.from_name(arch), EventLog(search_dir(c)),
                         progress=run_progress()).to_dict()


@task(name="export-onnx", task_run_name=_arch_run_name("export-onnx"))
def export_onnx_task(cfg: dict, arch: str, student_path: str) -> dict:
    c = config_from_dict(cfg)
    return export_student(student_path, c.latency).to_dict()


def publish_search_tables(result, teacher: str, teacher_ms: float) -> None:
    """The leaderboard and the recommendations as Prefect artifacts (shown in Prefect's UI)."""
    from kdnas_core.search.reports import markdown_table, recommendations_frame
    from kdnas_core.search.loop import SUMMARY_COLUMNS

    create_markdown_artifact(markdown_table(result.leaderboard[SUMMARY_COLUMNS]), key="kdnas-leaderboard",
                             description=f"KD-NAS leaderboard ({teacher}, {teacher_ms:.2f} ms)")
    create_markdown_artifact(markdown_table(recommendations_frame(result).drop(columns=["arch_id"])),
                             key="kdnas-recommendations", description="best student per latency budget")


@task(name="evaluate-students")
def evaluate_students_task(cfg: dict, student_dirs: list[str], out_dir: str) -> dict:
    """Downstream table of the final students (teacher, student, untrained floor) written next
    to the search's tables; returns the rows, the tasks and the file paths (an EvaluationTable's fields)."""
    c = config_from_dict(cfg)
    table = evaluate_students(workspace(c), student_dirs, progress=run_progress())
    files = write_evaluation(table, Path(out_dir))
    create_markdown_artifact(Path(files["md"]).read_text(), key="kdnas-evaluation",
                             description="downstream quality of the final students")
    ev = EvaluationTable.from_frame(table, files)
    return {"rows": ev.rows, "tasks": ev.tasks, **ev.files}
