"""The main job, one recipe whichever way it runs: the teacher, the search, each recommended
student distilled and exported, then the downstream evaluation, in that order, returning one
typed ``SearchOutcome``.

``run_search_job(cfg, steps)`` owns the order, the phases and what is skipped; ``steps`` does
each step. ``LocalSteps`` does them in this process (``kdnas search --no-prefect``); the Prefect
flow (flows/search.py) passes steps that run them as Prefect tasks and subflows (and, through
Prefect, on Dask). The CLI renders the outcome the same way for both (``render_outcome``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import pandas as pd

from kdnas_core.config import KDNASConfig
from kdnas_core.distill import DistillResult
from kdnas_core.search.candidates import EventLog, ProxyEvaluator, RecordedEvaluator, teacher_latency
from kdnas_core.final import FinalStudent, final_student
from kdnas_core.progress import Phases, Progress
from kdnas_core.search.reports import markdown_table
from kdnas_core.search.loop import SUMMARY_COLUMNS, Recommendation, SearchResult, SearchState, chosen_archs
from kdnas_core.search.space import StudentArch
from kdnas_core.search.runner import check_compatible, search_dir, search_in_folder
from kdnas_core.search.signals import SignalProbe, zero_cost_screen
from kdnas_core.evaluation.table import evaluate_students, evaluation_markdown, summary_lines, write_evaluation
from kdnas_core.workspace import Workspace


@dataclass(frozen=True)
class EvaluationTable:
    """The downstream table of a job's students (``evaluation.table.evaluate_students``): one row per
    model (teacher, each student, what it inherited, its floor), the tasks it was scored on, and
    the files it was written to."""

    rows: list[dict]
    tasks: list[dict]
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_frame(cls, table: pd.DataFrame, files: dict | None = None) -> EvaluationTable:
        # via JSON: NaN becomes None, numpy scalars become plain numbers
        return cls(json.loads(table.to_json(orient="records")), list(table.attrs.get("tasks", [])),
                   {k: str(v) for k, v in (files or {}).items()})

    def frame(self) -> pd.DataFrame:
        table = pd.DataFrame(self.rows)
        table.attrs["tasks"] = self.tasks
        return table

    def metrics(self) -> dict[str, dict[str, float]]:
        """Each student's own row (not its floor's) as MLflow metrics."""
        return {r["arch"]: {f"downstream.{k}": v for k, v in r.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "params_m"}
                for r in self.rows if r["role"] == "student"}


def final_from_dict(d: dict) -> FinalStudent:
    """A ``FinalStudent`` as a task boundary carried it (``to_dict``)."""
    names = {f.name for f in fields(FinalStudent)}
    return FinalStudent(**{k: v for k, v in d.items() if k in names and k != "result"},
                        result=DistillResult.from_dict(d["result"]))


@dataclass(frozen=True)
class SearchOutcome:
    """Everything a search job produced, as the CLI shows it and the flow returns it."""

    search_dir: str
    teacher_ms: float
    evaluated: int  # candidates evaluated by this run
    best: str | None  # the highest reward of this run
    leaderboard: list[dict]  # SUMMARY_COLUMNS, best reward first (every known candidate)
    recommendations: list[Recommendation]
    finals: dict[str, FinalStudent] = field(default_factory=dict)
    evaluation: EvaluationTable | None = None
    phases: dict[str, float] = field(default_factory=dict)
    tracking_run_id: str | None = None
    tracking_url: str | None = None
    tracking_spool: dict | None = None

    def to_dict(self) -> dict:
        """Plain JSON-able values; the keys the flow has always returned."""
        return {
            "tracking_run_id": self.tracking_run_id,
            "tracking_url": self.tracking_url,
            "search_dir": self.search_dir,
            "teacher_ms": self.teacher_ms,
            "evaluated": self.evaluated,
            "best": self.best,
            "leaderboard": self.leaderboard,
            "recommendations": [r.to_dict() for r in self.recommendations],
            "final": {arch: f.to_dict() for arch, f in self.finals.items()},
            "evaluation": self.evaluation.rows if self.evaluation else None,
            "evaluation_tasks": self.evaluation.tasks if self.evaluation else None,
            "evaluation_files": self.evaluation.files if self.evaluation else None,
            "tracking_spool": self.tracking_spool,
            "phases": self.phases,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchOutcome:
        evaluation = (EvaluationTable(d["evaluation"], d.get("evaluation_tasks") or [], d.get("evaluation_files") or {})
                      if d.get("evaluation") else None)
        return cls(d["search_dir"], d["teacher_ms"], d["evaluated"], d["best"], d.get("leaderboard") or [],
                   [Recommendation(**r) for r in d["recommendations"]],
                   {arch: final_from_dict(f) for arch, f in d["final"].items()}, evaluation, d.get("phases") or {},
                   d.get("tracking_run_id"), d.get("tracking_url"), d.get("tracking_spool"))


class JobSteps(Protocol):
    """How each step of the job is done (in this process, or as Prefect tasks)."""

    def teacher(self) -> float:
        """Get the teacher ready (its states, its checks); its latency in ms."""

    def search(self, teacher_ms: float) -> SearchResult:
        """The search of the config, in its folder (resumed, or a new round)."""

    def final_student(self, arch: str) -> FinalStudent:
        """One recommended architecture distilled on the full corpus and exported."""

    def evaluate(self, student_paths: list[str]) -> EvaluationTable:
        """The students on the downstream tasks, written beside the search's tables."""


def run_search_job(cfg: KDNASConfig, steps: JobSteps, final: bool = True) -> SearchOutcome:
    """Search, then (``final``) each recommended student once (one can win several budgets),
    then (``evaluate.enabled``) the downstream table of those students."""
    phases = Phases()
    with phases("teacher"):
        teacher_ms = steps.teacher()
    with phases("search"):
        result = steps.search(teacher_ms)
    finals: dict[str, FinalStudent] = {}
    evaluation = None
    if final:
        with phases("final distillation"):
            finals = {arch: steps.final_student(arch) for arch in chosen_archs(result.recommendations)}
        if finals and cfg.evaluate.enabled:
            with phases("evaluation"):
                evaluation = steps.evaluate([f.path for f in finals.values()])
    board = result.leaderboard[SUMMARY_COLUMNS] if len(result.leaderboard) else pd.DataFrame(columns=SUMMARY_COLUMNS)
    return SearchOutcome(str(search_dir(cfg)), teacher_ms, len(result.observations),
                         result.best.arch.name if result.best else None,
                         json.loads(board.to_json(orient="records")), result.recommendations, finals, evaluation,
                         phases.seconds)


class LocalSteps:
    """Every step in this process: ``kdnas search --no-prefect``."""

    def __init__(self, cfg: KDNASConfig, ws: Workspace | None = None, warm_from: Path | None = None,
                 fresh: bool = False, research: bool = False, on_observation: Callable | None = None,
                 progress: Progress = True):
        self.cfg, self._ws = cfg, ws
        self.warm_from, self.fresh, self.research = warm_from, fresh, research
        self.on_observation, self.progress = on_observation, progress

    def teacher(self) -> float:
        cfg = self.cfg
        self.ws = (self._ws or Workspace.prepare(cfg)).validate().check_tasks()
        if self.warm_from is not None:  # before any work: a state of another teacher is refused at once
            check_compatible(SearchState.load(self.warm_from), self.ws.teacher.fingerprint, cfg, self.warm_from)
        b, s = cfg.latency.reward_shape
        return teacher_latency(self.ws, progress=self.progress).median(cfg.latency.reward_backend, b, s)

    def search(self, teacher_ms: float) -> SearchResult:
        folder = search_dir(self.cfg)
        log = EventLog(folder)
        probe = functools.cache(lambda: SignalProbe(self.ws))  # one for the proxy runs and the screen
        evaluate = RecordedEvaluator(ProxyEvaluator(self.ws, self.progress, on_event=log, probe=probe), folder, log)
        screen = zero_cost_screen(probe, self.cfg.search.screen_signal, self.progress)
        return search_in_folder(self.cfg, self.ws.space, teacher_ms, evaluate=evaluate, warm_from=self.warm_from,
                                fresh=self.fresh, research=self.research, on_observation=self.on_observation,
                                teacher=self.ws.teacher.fingerprint, screen=screen)

    def final_student(self, arch: str) -> FinalStudent:
        folder = search_dir(self.cfg)
        return final_student(self.cfg, self.ws, StudentArch.from_name(arch), EventLog(folder),
                             progress=self.progress).exported(self.cfg.latency)

    def evaluate(self, student_paths: list[str]) -> EvaluationTable:
        table = evaluate_students(self.ws, student_paths, progress=self.progress)
        return EvaluationTable.from_frame(table, write_evaluation(table, search_dir(self.cfg)))


def search_without_prefect(cfg: KDNASConfig, warm_from: Path | None = None, fresh: bool = False,
                           progress: Progress = True, on_observation=None, ws: Workspace | None = None,
                           research: bool = False) -> tuple[SearchResult, Path, float]:
    """The job's first two steps in this process (no final students): the search's result, its
    folder and the teacher's latency. Resumes an interrupted run of the same config, or
    warm-starts from another search's ``state.json``."""
    steps = LocalSteps(cfg, ws, warm_from, fresh, research, on_observation, progress)
    teacher_ms = steps.teacher()
    return steps.search(teacher_ms), search_dir(cfg), teacher_ms


def render_outcome(outcome: SearchOutcome, teacher: str, top: int | None = None) -> list[str]:
    """What the terminal shows after a search, whichever way it ran."""
    lines = [f"Leaderboard (teacher {teacher}: {outcome.teacher_ms:.2f} ms)"]
    board = pd.DataFrame(outcome.leaderboard, columns=SUMMARY_COLUMNS)
    lines += [markdown_table(board.head(top) if top else board), "", "Recommendations per latency budget"]
    for r in outcome.recommendations:
        if r.arch:
            lines.append(f"  {r.budget:>8} (<= {r.budget_ms:.2f} ms): {r.arch} ({r.arch_id}), reward {r.reward:.4f}, "
                         f"{r.latency_ms:.2f} ms, {outcome.teacher_ms / r.latency_ms:.1f}x faster"
                         + (f"; {r.reason}" if r.reason else ""))
        else:
            lines.append(f"  {r.budget:>8} (<= {r.budget_ms:.2f} ms): none: {r.reason}")
    for arch, f in outcome.finals.items():
        lines.append(f"final student {arch}: {f.path} (ONNX: {f.onnx}, int8: {f.onnx_int8})")
    if outcome.evaluation is not None:
        table = outcome.evaluation.frame()
        lines += ["", evaluation_markdown(table), *summary_lines(table)]
        if "md" in outcome.evaluation.files:
            lines.append(f"evaluation: {outcome.evaluation.files['md']}")
    lines.append(f"\nstate and tables: {outcome.search_dir}")
    return lines

