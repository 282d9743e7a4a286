"""How a search candidate is measured: its latency (cached per hardware and arch_id), its proxy
distillation, and the record of each evaluation kept in the search folder so that a killed search
resumes without redoing one."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from kdnas_core.files.atomic import write_json
from kdnas_core.config import LatencyConfig
from kdnas_core.distill import distill
from kdnas_core.keys import key
from kdnas_core.latency import LatencyReport, hardware_key, profile_model
from kdnas_core.progress import Progress
from kdnas_core.search.reward import l_hs
from kdnas_core.search.loop import BatchEvaluator, Evaluation, Evaluator
from kdnas_core.search.signals import SignalProbe, Signals
from kdnas_core.search.space import StudentArch
from kdnas_core.student import TRAINING_BYTES_PER_PARAM, count_parameters
from kdnas_core.workspace import Workspace


def teacher_latency(ws: Workspace, cfg: LatencyConfig | None = None, progress: Progress = False) -> LatencyReport:
    """The teacher's latency (the reward's reference), measured once per hardware, teacher and
    latency settings, then read back from ``<cache_dir>/latency/``."""
    cfg = cfg or ws.cfg.latency
    settings = key("latency_settings", ws.cfg.model_copy(update={"latency": cfg}))
    path = ws.cfg.paths.cache_path() / "latency" / hardware_key(cfg) / f"teacher-{ws.teacher.fingerprint}-{settings}.json"
    if path.is_file():
        return LatencyReport.from_dict(json.loads(path.read_text()))
    report = profile_model(ws.teacher.model, cfg, progress=progress)
    write_json(path, report.to_dict())
    return report


def profile_arch(ws: Workspace, arch: StudentArch, cfg: LatencyConfig | None = None, cache: bool = True,
                 progress: Progress = False) -> LatencyReport:
    """Latency of ``arch`` as a student of this teacher. Weights do not change latency, so an
    untrained student is timed, and a measurement is kept per hardware, latency settings,
    teacher vocabulary and arch_id: a resumed or repeated search never re-times an arch."""
    cfg = cfg or ws.cfg.latency
    ws.space.validate(arch)
    t = ws.teacher.config
    settings = key("latency_settings", ws.cfg.model_copy(update={"latency": cfg}))
    kind = t.model_type if ws.inheritance is None else "bert"  # the student's model class
    folder = f"{settings}-{kind}-v{t.vocab_size}-p{t.max_position_embeddings}"
    path = ws.cfg.paths.cache_path() / "latency" / hardware_key(cfg) / "students" / folder / f"{arch.arch_id}.json"
    if cache and path.is_file():
        try:
            return LatencyReport.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # damaged: measure again
    report = profile_model(ws.untrained_student(arch), cfg, progress=progress)
    if cache:
        write_json(path, report.to_dict())
    return report


@dataclass(frozen=True)
class LatencyProfile:
    """A candidate's latency: the reward's number and the full report it was read from."""

    latency_ms: float  # median at latency.reward_shape on latency.reward_backend
    report: LatencyReport

    def to_dict(self) -> dict:
        return {"latency_ms": self.latency_ms, "report": self.report.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyProfile:
        return cls(d["latency_ms"], LatencyReport.from_dict(d["report"]))


def latency_profile(ws: Workspace, arch: StudentArch, progress: Progress = False) -> LatencyProfile:
    """``arch``'s latency as the reward reads it (cached, see ``profile_arch``)."""
    report = profile_arch(ws, arch, progress=progress)
    return LatencyProfile(report.median(ws.cfg.latency.reward_backend, *ws.cfg.latency.reward_shape), report)


@dataclass(frozen=True)
class ProxyResult:
    """A candidate's proxy distillation."""

    kd_loss: float  # normalised hidden-state loss L_HS in [0, 1], the reward's quality term
    final_eval_loss: float
    pooled_cosine: float | None
    params_m: float
    steps: int
    distill_s: float
    loss_curve: list = field(default_factory=list, repr=False)
    # The trained student's quality signals on the held-out texts (``search.signals``).
    signals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProxyResult:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def evaluation(self, latency_ms: float, quality: str = "hidden", **extra) -> Evaluation:
        """What the search records: the loss curve goes to tracking, not into the state.
        ``quality`` (reward.quality) names the signal that is the reward's quality term."""
        details = {k: v for k, v in self.to_dict().items() if k not in ("kd_loss", "loss_curve")}
        q = None if quality == "hidden" else Signals(**self.signals).quality(quality)
        return Evaluation(self.kd_loss, latency_ms, {**details, **extra}, quality=q)


class ProxyEvaluator:
    """The real KD-NAS evaluator: distil a candidate on the proxy split (teacher states from the
    cache, built once for every depth in the space) and measure its latency."""

    def __init__(self, ws: Workspace, progress: Progress = True, on_event=None,
                 probe: Callable[[], SignalProbe] | None = None):
        """``probe`` gives the quality signals' probe when it is shared (with the zero-cost
        screen); by default the evaluator builds its own at the first candidate."""
        self.ws, self.progress = ws, progress
        self._probe = probe or functools.cache(lambda: SignalProbe(ws))
        self.on_event = on_event or (lambda event, arch: None)
        layers = ws.layers_for(ws.space.layers)
        self.states = ws.cached_states("proxy", layers, progress)
        self.eval_states = ws.eval_states(layers, progress)
        self.batches = ws.distill_batches("proxy", self.states, progress=progress)
        self.eval_batches = ws.batches("eval")

    def distill(self, arch: StudentArch, progress: Progress | None = None) -> ProxyResult:
        """Proxy-distil ``arch`` from its start (teacher slice or random) on the proxy split;
        ``progress`` replaces the evaluator's own for this one (a task logs to its own run)."""
        cfg = self.ws.cfg
        self.ws.space.validate(arch)
        start = self.ws.start_student(arch, TRAINING_BYTES_PER_PARAM, cfg.distill.dropout)
        student = start.model
        r = distill(
            student, self.states, self.batches, cfg.distill.recipe("proxy"), cfg.distill.proxy,
            eval_batches=self.eval_batches, eval_states=self.eval_states, seed=cfg.seed,
            progress=self.progress if progress is None else progress, init_heads=start.init_heads,
            pooling=self.ws.teacher.head.pooling,
        )
        # A forward pass or two over the held-out texts: a few per cent of the proxy run.
        signals = self.probe.of(student, r.eval_parts).to_dict()
        return ProxyResult(l_hs(r.eval_parts, r.final_eval_loss), r.final_eval_loss, r.eval_parts.get("pooled_cosine"),
                           count_parameters(student) / 1e6, r.steps, round(r.seconds, 1), r.loss_curve, signals)

    @property
    def probe(self) -> SignalProbe:
        """The held-out texts and the teacher's embeddings the quality signals read."""
        return self._probe()

    def __call__(self, arch: StudentArch) -> Evaluation:
        self.on_event("proxy-distill", arch)
        proxy = self.distill(arch)
        self.on_event("profile-latency", arch)
        return proxy.evaluation(latency_profile(self.ws, arch, self.progress).latency_ms, self.ws.cfg.reward.quality)


class EventLog:
    """``events.jsonl`` of a search folder: what started and finished when, one JSON object a
    line (appended and flushed, so a killed process leaves every line it wrote)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "events.jsonl"

    def __call__(self, event: str, arch: StudentArch | None = None, **info) -> None:
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = {"time": round(time.time(), 3), "pid": os.getpid(), "event": event,
                **({"arch": arch.name, "arch_id": arch.arch_id} if arch is not None else {}), **info}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        # The last line may be cut by a kill mid-write; skip what does not parse.
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


class RecordedEvaluator:
    """Keeps each candidate's evaluation in ``<search folder>/evals/<arch_id>.json`` the moment
    it exists: a search killed after an evaluation but before the state recorded it picks the
    result up instead of distilling the candidate again."""

    def __init__(self, evaluate: Evaluator, folder: Path, log: EventLog):
        self.evaluate, self.folder, self.log = evaluate, Path(folder) / "evals", log

    def _recorded(self, arch: StudentArch) -> Evaluation | None:
        path = self.folder / f"{arch.arch_id}.json"
        if path.is_file():
            try:
                d = json.loads(path.read_text())
                self.log("evaluation-reused", arch)
                return Evaluation(d["kd_loss"], d["latency_ms"], d.get("extra", {}), quality=d.get("quality"))
            except (ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return None

    def _record(self, arch: StudentArch, ev: Evaluation) -> None:
        if ev.failed:  # not kept: a resumed search tries a failed candidate again
            self.log("evaluation-failed", arch, error=ev.extra.get("error", ""))
            return
        write_json(self.folder / f"{arch.arch_id}.json",
                   {"kd_loss": ev.kd_loss, "latency_ms": ev.latency_ms, "extra": ev.extra, "quality": ev.quality})
        self.log("evaluation-done", arch)

    def __call__(self, arch: StudentArch) -> Evaluation:
        if (ev := self._recorded(arch)) is not None:
            return ev
        self.log("evaluation-start", arch)
        try:
            ev = self.evaluate(arch)
        except Exception as err:
            self.log("evaluation-failed", arch, error=f"{type(err).__name__}: {err}"[:300])
            raise
        self._record(arch, ev)
        return ev

    @classmethod
    def batch(cls, evaluate_batch: BatchEvaluator, folder: Path, log: EventLog) -> BatchEvaluator:
        """The same record for a batch evaluator (the Prefect flow's fan-out): recorded
        candidates are not sent out again, the others are recorded as their results come back."""
        rec = cls(lambda arch: None, folder, log)

        def run(archs: list[StudentArch]) -> list[Evaluation]:
            known = {a.arch_id: ev for a in archs if (ev := rec._recorded(a)) is not None}
            todo = [a for a in archs if a.arch_id not in known]
            for a in todo:
                log("evaluation-start", a)
            for a, ev in zip(todo, evaluate_batch(todo) if todo else []):
                rec._record(a, ev)
                known[a.arch_id] = ev
            return [known[a.arch_id] for a in archs]

        return run
