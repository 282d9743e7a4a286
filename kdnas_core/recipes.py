"""Recipes: the library pieces put together for one job (torchtune's split of library vs recipe).

``Workspace`` holds what every job of a search shares (teacher, splits, tokenised texts, cached
teacher states); ``distill_one`` distils one architecture end to end; ``ProxyEvaluator`` is the
search's evaluator; ``run_kdnas_search`` is the whole search without Prefect. The CLI and the
Prefect tasks call these same functions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kdnas_core.atomic import write_json, write_text
from kdnas_core.config import NOT_SEARCH, KDNASConfig, LatencyConfig, TrainBudget
from kdnas_core.errors import ArchError, ConfigError, DataError, KdnasError
from kdnas_core.data import Batch, Splits, TokenizedTexts, length_bucketed_batches, load_splits, tokenize
from kdnas_core.distill import (
    CachedTeacherStates,
    DataParallel,
    SharedStates,
    TeacherStates,
    distill,
    make_teacher_states,
    teacher_layers_needed,
)
from kdnas_core.controller import make_controller
from kdnas_core.checkpoint import remove_checkpoint
from kdnas_core.lock import exclusive
from kdnas_core.evaluate import LabelledTask, ModelEval, compare, evaluate_model, load_task
from kdnas_core.latency import (
    LatencyPredictor,
    LatencyReport,
    export_onnx,
    hardware_key,
    predictor_path,
    profile_model,
    quantize_onnx,
)
from kdnas_core.reward import budgeted_reward, normalised_loss, parse_budget, reward
from kdnas_core.search import (
    SUMMARY_COLUMNS,
    BatchEvaluator,
    Evaluation,
    Evaluator,
    SearchResult,
    SearchState,
    budgets_in_ms,
    run_search,
)
from kdnas_core.search_space import SearchSpace, StudentArch
from kdnas_core.student import (
    TRAINING_BYTES_PER_PARAM,
    DamagedStudent,
    build_student,
    check_fits_in_memory,
    check_student_destination,
    count_parameters,
    load_student,
    save_student,
    verify_student,
)
from kdnas_core.teachers import Teacher, load_teacher


@dataclass
class Workspace:
    cfg: KDNASConfig
    teacher: Teacher
    _tokens: dict[str, TokenizedTexts] = field(default_factory=dict)
    # Where teacher-state caches are shared with other machines (set by the orchestration
    # layer from paths.shared_cache; None: this machine's cache folder only).
    shared_states: SharedStates | None = None

    @classmethod
    def prepare(cls, cfg: KDNASConfig) -> Workspace:
        return cls(cfg, load_teacher(cfg.teacher, cfg.paths.cache_path()))

    def validate(self) -> Workspace:
        """Fail fast, before anything is written, on inputs that would only fail later."""
        cfg, t = self.cfg, self.teacher.config
        # RoBERTa-family position ids start after the padding index, so two positions are unusable.
        usable = t.max_position_embeddings - (2 if t.model_type in ("roberta", "xlm-roberta", "mpnet", "camembert") else 0)
        if cfg.data.max_length > usable:
            raise DataError(f"data.max_length = {cfg.data.max_length} is longer than the teacher accepts "
                            f"({usable} positions for {cfg.teacher.name})")
        splits = self.splits
        if cfg.data.proxy_size > len(splits.train):
            raise DataError(f"data.proxy_size = {cfg.data.proxy_size} is larger than the train split "
                            f"({len(splits.train)} texts after holding out {len(splits.eval)} eval texts); "
                            "lower it or give a larger corpus")
        for name, path in (("paths.output_dir", cfg.paths.output_path()), ("paths.cache_dir", cfg.paths.cache_path())):
            check_writable(path, name)
        return self

    @functools.cached_property
    def splits(self) -> Splits:
        # Lazy: latency profiling needs the teacher but no text.
        return load_splits(self.cfg.data, self.cfg.seed)

    @functools.cached_property
    def space(self) -> SearchSpace:
        return SearchSpace(self.cfg.search_space, self.teacher.shape)

    @property
    def state_cache_root(self) -> Path:
        return self.cfg.paths.cache_path() / "teacher_states"

    def tokens(self, split: str) -> TokenizedTexts:
        if split not in self._tokens:
            texts = self.splits.get(split)
            if split == "eval":  # the held-out KD loss needs only a slice of the eval split
                texts = texts[: self.cfg.distill.eval_batches * self.cfg.data.batch_size]
            self._tokens[split] = tokenize(texts, self.teacher.tokenizer, self.cfg.data.max_length)
        return self._tokens[split]

    def batches(self, split: str, seed: int | None = None) -> list[Batch]:
        shuffle = split != "eval"
        seed = self.cfg.seed if seed is None else seed
        return length_bucketed_batches(self.tokens(split), self.cfg.data.batch_size, seed, shuffle)

    def layers_for(self, student_layers: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        d = self.cfg.distill
        return teacher_layers_needed(student_layers, self.teacher.num_layers, d.mapping, d.weights)

    def teacher_states(self, split: str, layers: tuple[int, ...], passes: float, progress: bool = True) -> TeacherStates:
        # Standardisation statistics for a live teacher come from the first few training batches.
        stats_batches = self.batches(split)[:20]
        return make_teacher_states(
            self.teacher, self.tokens(split), layers, self.cfg.distill,
            self.state_cache_root, math.ceil(passes), stats_batches, progress, self.shared_states,
        )

    def distill_inputs(self, split: str, budget: TrainBudget, student_layers: int, progress: bool = True
                       ) -> tuple[list[Batch], TeacherStates, CachedTeacherStates]:
        """Batches, teacher states and held-out states of a distillation of ``budget`` on ``split``."""
        batches = self.batches(split)
        passes = budget.epochs if not budget.max_steps else min(budget.epochs, budget.max_steps / len(batches))
        layers = self.layers_for([student_layers])
        return batches, self.teacher_states(split, layers, passes, progress), self.eval_states(layers, progress)

    def cached_states(self, split: str, layers: tuple[int, ...], progress: bool = True) -> CachedTeacherStates:
        """Teacher states of ``split`` computed once (reused from disk when present)."""
        relation = self.teacher.num_layers if self.cfg.distill.weights.attention_relation > 0 else None
        root = self.state_cache_root if self.cfg.distill.cache_on_disk else None
        return CachedTeacherStates.build(self.teacher, self.tokens(split), layers, relation, root, progress=progress,
                                         shared=self.shared_states if root is not None else None)

    def eval_states(self, layers: tuple[int, ...], progress: bool = True) -> CachedTeacherStates:
        # Evaluated twice per candidate and shared by all of them: always worth caching.
        return self.cached_states("eval", layers, progress)

    @functools.cached_property
    def task(self) -> LabelledTask:
        """The downstream task, its test texts outside everything a student is distilled on."""
        return load_task(self.cfg.evaluate, self.cfg.data, self.splits.train, self.cfg.seed)

    def evaluate(self, model, name: str, progress: bool = True) -> ModelEval:
        e = self.cfg.evaluate
        return evaluate_model(model, self.teacher.tokenizer, name, self.task, e, e.max_length or self.cfg.data.max_length,
                              self.cfg.paths.cache_path() / "embeddings", self.cfg.seed, progress)

    @functools.cached_property
    def teacher_eval(self) -> ModelEval:
        return self.evaluate(self.teacher.model, f"teacher {self.cfg.teacher.name}")


def check_writable(path: Path, name: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".kdnas-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{name} = {str(path)!r}: not writable ({err.strerror or type(err).__name__})") from None


def teacher_latency(ws: Workspace, cfg: LatencyConfig | None = None) -> LatencyReport:
    """The teacher's latency (the reward's reference), measured once per hardware, teacher and
    latency settings, then read back from ``<cache_dir>/latency/``."""
    cfg = cfg or ws.cfg.latency
    settings = hashlib.sha1(cfg.model_dump_json().encode()).hexdigest()[:10]
    path = ws.cfg.paths.cache_path() / "latency" / hardware_key(cfg) / f"teacher-{ws.teacher.fingerprint}-{settings}.json"
    if path.is_file():
        return LatencyReport.from_dict(json.loads(path.read_text()))
    report = profile_model(ws.teacher.model, cfg)
    write_json(path, report.to_dict())
    return report


def profile_arch(ws: Workspace, arch: StudentArch, cfg: LatencyConfig | None = None, cache: bool = True) -> LatencyReport:
    """Latency of ``arch`` as a student of this teacher. Weights do not change latency, so an
    untrained student is timed, and a measurement is kept per hardware, latency settings,
    teacher vocabulary and arch_id: a resumed or repeated search never re-times an arch."""
    cfg = cfg or ws.cfg.latency
    ws.space.validate(arch)
    t = ws.teacher.config
    key = hashlib.sha1(f"{cfg.model_dump_json()}:{t.vocab_size}:{t.max_position_embeddings}".encode()).hexdigest()[:10]
    path = ws.cfg.paths.cache_path() / "latency" / hardware_key(cfg) / "students" / key / f"{arch.arch_id}.json"
    if cache and path.is_file():
        try:
            return LatencyReport.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # damaged: measure again
    report = profile_model(build_student(arch, ws.teacher, seed=0, init_from_teacher=False), cfg)
    if cache:
        write_json(path, report.to_dict())
    return report


def checkpoint_path(cfg: KDNASConfig, out_dir: Path, split: str, max_steps: int | None) -> Path:
    """Next to the student folder, keyed by config: a rerun of the same job resumes from it."""
    config_hash = cfg.section_hash("seed", "teacher", "data", "distill")
    return out_dir.with_name(f".{out_dir.name}-{split}-{config_hash}-{max_steps or 0}.ckpt")


def final_config_hash(cfg: KDNASConfig) -> str:
    """What a saved student depends on; the number of processes that trained it is not."""
    return cfg.section_hash("teacher", "data", "distill", exclude=("distill.world_size",))


def distill_one(
    cfg: KDNASConfig,
    arch: str | StudentArch,
    split: str = "train",
    out_dir: Path | None = None,
    max_steps: int | None = None,
    ws: Workspace | None = None,
    progress: bool = True,
) -> dict:
    """Distil one architecture on ``split`` and save it; returns a JSON-able summary."""
    ws = ws or Workspace.prepare(cfg).validate()
    arch = StudentArch.from_name(arch) if isinstance(arch, str) else arch
    ws.space.validate(arch)
    check_fits_in_memory(arch, ws.teacher.config, TRAINING_BYTES_PER_PARAM)  # before the teacher runs
    out_dir = Path(out_dir) if out_dir else cfg.paths.output_path() / "students" / arch.arch_id
    check_student_destination(out_dir)  # a user's folder is refused before, not after, the work
    budget = cfg.distill.final if split == "train" else cfg.distill.proxy
    if max_steps:
        budget = budget.model_copy(update={"max_steps": max_steps})
    batches, states, eval_states = ws.distill_inputs(split, budget, arch.layers, progress)
    student = build_student(arch, ws.teacher, seed=cfg.seed, dropout=cfg.distill.dropout,
                            bytes_per_param=TRAINING_BYTES_PER_PARAM)
    ckpt = checkpoint_path(cfg, out_dir, split, budget.max_steps)
    result = distill(
        student, states, batches, cfg.distill, budget,
        eval_batches=ws.batches("eval"), eval_states=eval_states, seed=cfg.seed, progress=progress,
        checkpoint=ckpt, checkpoint_every=cfg.distill.checkpoint_every,
    )
    parallel = DataParallel.active()
    meta = {
        "teacher": cfg.teacher.name,
        "teacher_fingerprint": ws.teacher.fingerprint,
        "split": split,
        "config_hash": final_config_hash(cfg),
        "world_size": parallel.world if parallel else 1,
        "result": result.to_dict(),
    }
    path = out_dir
    if parallel is None or parallel.main:  # every process holds the same weights: one saves
        path = save_student(student, ws.teacher.tokenizer, arch, out_dir, meta)
        remove_checkpoint(ckpt)
    return {
        "arch": arch.name,
        "arch_id": arch.arch_id,
        "params": count_parameters(student),
        "teacher": cfg.teacher.name,
        "teacher_params": count_parameters(ws.teacher.model),
        "n_texts": len(ws.splits.get(split)),
        "result": result.to_dict(),
        "path": str(path),
    }



class ProxyEvaluator:
    """The real KD-NAS evaluator: distil a candidate on the proxy split (teacher states from the
    cache, built once for every depth in the space) and measure its latency."""

    def __init__(self, ws: Workspace, progress: bool = True, on_event=None):
        self.ws, self.progress = ws, progress
        self.on_event = on_event or (lambda event, arch: None)
        layers = ws.layers_for(ws.space.layers)
        self.states = ws.cached_states("proxy", layers, progress)
        self.eval_states = ws.eval_states(layers, progress)
        self.batches = ws.batches("proxy")
        self.eval_batches = ws.batches("eval")
        self.backend = ws.cfg.latency.reward_backend
        self.shape = ws.cfg.latency.grid[0]

    def distill(self, arch: StudentArch) -> dict:
        """Proxy-distil ``arch``; returns the normalised loss L_HS and details (JSON-able)."""
        cfg = self.ws.cfg
        self.ws.space.validate(arch)
        student = build_student(arch, self.ws.teacher, seed=cfg.seed, dropout=cfg.distill.dropout,
                                bytes_per_param=TRAINING_BYTES_PER_PARAM)
        r = distill(
            student, self.states, self.batches, cfg.distill, cfg.distill.proxy,
            eval_batches=self.eval_batches, eval_states=self.eval_states, seed=cfg.seed, progress=self.progress,
        )
        hidden = r.eval_parts.get("hidden_mse", r.final_eval_loss)
        return {"kd_loss": normalised_loss(hidden), "final_eval_loss": r.final_eval_loss,
                "pooled_cosine": r.eval_parts.get("pooled_cosine"), "params_m": count_parameters(student) / 1e6,
                "steps": r.steps, "distill_s": round(r.seconds, 1), "loss_curve": r.loss_curve}

    def __call__(self, arch: StudentArch) -> Evaluation:
        self.on_event("proxy-distill", arch)
        d = self.distill(arch)
        d.pop("loss_curve")
        self.on_event("profile-latency", arch)
        latency = profile_arch(self.ws, arch).median(self.backend, *self.shape)
        return Evaluation(kd_loss=d.pop("kd_loss"), latency_ms=latency, extra=d)


def evaluate_students(ws: Workspace, student_dirs: list[str | Path], progress: bool = True) -> pd.DataFrame:
    """Downstream table of saved students: the teacher, then each student and its untrained
    floor (same architecture and initialisation as its distillation started from)."""
    teacher = ws.teacher_eval
    e = ws.cfg.evaluate
    rows = [{"role": "teacher", "arch": None, "arch_id": None, **compare(teacher, teacher, None, e, ws.cfg.seed)}]
    for d in student_dirs:
        model, arch = load_student(Path(d))
        floor = ws.evaluate(build_student(arch, ws.teacher, seed=ws.cfg.seed), f"{arch.name} untrained", progress)
        student = ws.evaluate(model, arch.name, progress)
        rows.append({"role": "student", "arch": arch.name, "arch_id": arch.arch_id, **compare(student, teacher, floor, e, ws.cfg.seed)})
        rows.append({"role": "floor", "arch": arch.name, "arch_id": arch.arch_id, **compare(floor, teacher, None, e, ws.cfg.seed)})
    table = pd.DataFrame(rows)
    table.attrs["task"] = {"test_texts": len(ws.task.test_texts), "train_texts": len(ws.task.train_texts),
                           "classes": ws.task.classes, "notes": ws.task.notes}
    return table


EVAL_COLUMNS = ["model", "params_m", "probe_acc", "probe_f1", "pct_teacher_acc", "gap_closed_acc",
                "gap_closed_acc_se", "gap_closed_f1", "recall@10", "cka"]


def write_evaluation(table: pd.DataFrame, out: Path) -> dict:
    """``evaluation.csv`` and ``evaluation.md`` next to a search's other tables."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "evaluation.csv", table.to_csv(index=False))
    task = table.attrs.get("task", {})
    cols = [c for c in EVAL_COLUMNS if c in table.columns]
    md = ["# Downstream evaluation\n",
          f"Linear probe on mean-pooled embeddings, {task.get('train_texts')} train / {task.get('test_texts')} held-out "
          f"texts, classes {task.get('classes')}. Gap closed = (student - untrained floor) / (teacher - floor), "
          "± bootstrap standard error.\n", *[f"- note: {n}" for n in task.get("notes", [])], "",
          markdown_table(table[cols]), ""]
    write_text(out / "evaluation.md", "\n".join(md))
    return {"csv": str(out / "evaluation.csv"), "md": str(out / "evaluation.md")}


class EventLog:
    """``events.jsonl`` of a search folder: what started and finished when, one JSON object a
    line (appended and flushed, so a killed process leaves every line it wrote)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "events.jsonl"

    def __call__(self, event: str, arch: StudentArch | None = None, **info) -> None:
        import os
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
                return Evaluation(d["kd_loss"], d["latency_ms"], d.get("extra", {}))
            except (ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return None

    def _record(self, arch: StudentArch, ev: Evaluation) -> None:
        if ev.failed:  # not kept: a resumed search tries a failed candidate again
            self.log("evaluation-failed", arch, error=ev.extra.get("error", ""))
            return
        write_json(self.folder / f"{arch.arch_id}.json", {"kd_loss": ev.kd_loss, "latency_ms": ev.latency_ms, "extra": ev.extra})
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


def final_students(cfg: KDNASConfig, ws: Workspace, recommendations: list[dict], log: EventLog | None = None,
                   progress: bool = True) -> dict[str, dict]:
    """Full-corpus distillation and ONNX export of each recommended architecture, without
    Prefect. A student already saved for this config is kept; an interrupted one resumes from
    its checkpoint."""
    finals: dict[str, dict] = {}
    for name in dict.fromkeys(r["arch"] for r in recommendations if r["arch"]):
        summary = final_student(cfg, ws, StudentArch.from_name(name), log, progress)
        finals[name] = {**summary, **export_student(summary["path"], cfg.latency)}
    return finals


def final_student(cfg: KDNASConfig, ws: Workspace, arch: StudentArch, log: EventLog | None = None,
                  progress: bool = True) -> dict:
    """One final student: kept if already saved for this config, resumed from its checkpoint
    if interrupted, distilled otherwise (the plain loop and the flow's task share this)."""
    log = log or (lambda *a, **k: None)
    folder = cfg.paths.output_path() / "students" / arch.arch_id
    meta_file = folder / "kdnas_arch.json"
    meta = saved_student_meta(folder, log)
    if meta.get("config_hash") == final_config_hash(cfg) and meta.get("split") == "train":
        log("final-reused", arch)
        # killed after saving the student but before removing its checkpoint: tidy up
        remove_checkpoint(checkpoint_path(cfg, folder, "train", cfg.distill.final.max_steps))
        return {"arch": arch.name, "arch_id": arch.arch_id, "result": meta["result"], "path": str(folder)}
    log("final-start", arch, world_size=cfg.distill.world_size)
    if cfg.distill.world_size > 1:
        from kdnas_core.ddp import launch

        ws.distill_inputs("train", cfg.distill.final, arch.layers, progress)  # built once; the processes read them
        launch(cfg, arch, folder)
        meta = json.loads(meta_file.read_text())
        summary = {"arch": arch.name, "arch_id": arch.arch_id, "result": meta["result"], "path": str(folder),
                   "world_size": meta["world_size"]}
    else:
        summary = distill_one(cfg, arch, split="train", out_dir=folder, ws=ws, progress=progress)
    log("final-done", arch)
    return summary


def saved_student_meta(folder: Path, log=None) -> dict:
    """The metadata of the student saved in ``folder`` when it is intact; {} when there is none,
    or when it was damaged since it was saved (then it is distilled again, resuming from its
    checkpoint where one is left)."""
    if not folder.is_dir():
        return {}
    try:
        verify_student(folder)
        return json.loads((folder / "kdnas_arch.json").read_text())
    except DamagedStudent as err:
        warnings.warn(f"{err}; distilling it again")
        if log:
            log("final-damaged", None, folder=str(folder))
        return {}
    except ArchError:
        return {}


def export_student(student_path: str | Path, cfg: LatencyConfig) -> dict:
    """ONNX (fp32) and dynamic-int8 ONNX files next to a saved student."""
    path = Path(student_path)
    model, arch = load_student(path)
    onnx = export_onnx(model, path / "model.onnx", cfg.opset)
    int8 = quantize_onnx(onnx, path / "model.int8.onnx")
    return {"arch": arch.name, "arch_id": arch.arch_id, "onnx": str(onnx), "onnx_int8": str(int8)}


def search_dir(cfg: KDNASConfig) -> Path:
    """One folder per search configuration: re-running the same config resumes it."""
    key = cfg.section_hash("seed", "teacher", "data", "search_space", "distill", "latency", "reward", "controller",
                           "search", exclude=NOT_SEARCH)
    return cfg.paths.output_path() / "search" / key


def make_reward_fn(cfg: KDNASConfig, teacher_ms: float, budgets: list[tuple[str, float]]):
    r = cfg.reward
    loosest = max((ms for _, ms in budgets), default=float("inf"))

    def reward_fn(l_hs: float, latency_ms: float) -> float:
        value = reward(l_hs, latency_ms, teacher_ms, r.alpha, r.beta)
        # Slower than every budget: useless to the user, so the controller learns to avoid it.
        judged = budgeted_reward(value, latency_ms, loosest, r.over_budget, r.penalty)
        return 0.0 if judged is None else judged

    return reward_fn


def initial_state(cfg: KDNASConfig, state_path: Path, warm_from: Path | None = None,
                  research: bool = False, fresh: bool = False, teacher: str = "") -> SearchState:
    state = _initial_state(cfg, state_path, warm_from, research, fresh)
    source = warm_from if warm_from is not None and not state.observations else state_path
    _check_teacher(state, teacher, cfg, source)
    state.teacher = teacher or state.teacher
    return state


def _check_teacher(state: SearchState, teacher: str, cfg: KDNASConfig, source: Path) -> None:
    if teacher and state.teacher and state.teacher != teacher:
        raise KdnasError(f"{source}: searched with another teacher (fingerprint {state.teacher}, this config's "
                         f"teacher {cfg.teacher.name!r} is {teacher}); its rewards do not apply here "
                         "(use --fresh, or warm-start from a search of this teacher)")


def _initial_state(cfg: KDNASConfig, state_path: Path, warm_from: Path | None = None,
                   research: bool = False, fresh: bool = False) -> SearchState:
    """Where a search starts: an interrupted run of this config resumes; a finished one is
    shown again, or, with ``research`` (scheduled re-searches), continued by a new round that
    warm-starts from it; ``warm_from`` seeds a new search with another search's state."""
    if state_path.is_file() and not fresh:
        state = SearchState.load(state_path)
        finished = state.episode >= state.start_episode + cfg.search.episodes and not state.pending
        if finished and research:
            # A new seed per round, so each re-search explores differently.
            return SearchState.warm_start(state, seed=cfg.seed + state.episode)
        return state
    if warm_from is not None:
        return SearchState.warm_start(SearchState.load(warm_from), cfg.seed)
    return SearchState(seed=cfg.seed)


def attach_latency_predictor(controller, cfg: KDNASConfig, budgets: list[tuple[str, float]]) -> LatencyPredictor | None:
    """Reuse this hardware's latency predictor (if an earlier search saved one) to keep the
    controller's pool within the loosest budget: archs predicted slower than every budget are
    worthless when over-budget candidates are excluded."""
    path = predictor_path(cfg.paths.cache_path(), cfg.latency)
    if not path.is_file() or not budgets or cfg.reward.over_budget != "exclude" or not hasattr(controller, "feasible"):
        return None
    pred = LatencyPredictor.load(path)
    loosest = max(ms for _, ms in budgets)
    controller.feasible = lambda a: pred.predict(a) <= loosest
    return pred


def update_latency_predictor(cfg: KDNASConfig, observations, hardware: str = "") -> Path | None:
    """Refit the predictor on every measured latency so far and save it for later searches."""
    measured = [o for o in observations if o.latency_ms > 0]
    if len(measured) < 3:
        return None
    b, s = cfg.latency.grid[0]
    pred = LatencyPredictor.fit([o.arch for o in measured], [o.latency_ms for o in measured], b, s,
                                cfg.latency.reward_backend, hardware)
    return pred.save(predictor_path(cfg.paths.cache_path(), cfg.latency))


def search_in_folder(
    cfg: KDNASConfig,
    space: SearchSpace,
    teacher_ms: float,
    evaluate: Evaluator | None = None,
    evaluate_batch: BatchEvaluator | None = None,
    warm_from: Path | None = None,
    fresh: bool = False,
    research: bool = False,
    on_observation=None,
    teacher: str = "",
) -> SearchResult:
    """The search of one config in its folder (``search_dir``): find where it starts, run the
    episodes with the given evaluator, write the tables and refit the latency predictor. The
    plain loop and the Prefect flow differ only in the evaluator they pass."""
    out = search_dir(cfg)
    state_path = out / "state.json"
    budgets = budgets_in_ms([parse_budget(x) for x in cfg.reward.budgets], teacher_ms)
    with exclusive(out, f"the search of this config ({out})"):
        if fresh:
            shutil.rmtree(out / "evals", ignore_errors=True)
        state = initial_state(cfg, state_path, warm_from, research, fresh, teacher)
        controller = make_controller(space, cfg.controller, cfg.seed)
        attach_latency_predictor(controller, cfg, budgets)
        result = run_search(controller, evaluate, make_reward_fn(cfg, teacher_ms, budgets), cfg.search, state,
                            budgets, on_state=lambda st: st.save(state_path), on_observation=on_observation,
                            seed=state.seed, evaluate_batch=evaluate_batch)
        write_search_tables(result, out, teacher_ms)
        update_latency_predictor(cfg, result.state.history)
    return result


def run_kdnas_search(cfg: KDNASConfig, warm_from: Path | None = None, fresh: bool = False,
                     progress: bool = True, on_observation=None, ws: Workspace | None = None,
                     research: bool = False) -> tuple[SearchResult, Path, float]:
    """A full search on this machine without Prefect: resumes an interrupted run of the same
    config, or warm-starts from another search's ``state.json``."""
    ws = (ws or Workspace.prepare(cfg)).validate()
    if warm_from is not None:  # before any work: a state of another teacher is refused at once
        _check_teacher(SearchState.load(warm_from), ws.teacher.fingerprint, cfg, warm_from)
    b, s = cfg.latency.grid[0]
    teacher_ms = teacher_latency(ws).median(cfg.latency.reward_backend, b, s)
    folder = search_dir(cfg)
    log = EventLog(folder)
    evaluate = RecordedEvaluator(ProxyEvaluator(ws, progress, on_event=log), folder, log)
    result = search_in_folder(cfg, ws.space, teacher_ms, evaluate=evaluate, warm_from=warm_from,
                              fresh=fresh, research=research, on_observation=on_observation,
                              teacher=ws.teacher.fingerprint)
    return result, folder, teacher_ms


def write_search_tables(result: SearchResult, out: Path, teacher_ms: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "leaderboard.csv", result.leaderboard.to_csv(index=False))
    write_text(out / "pareto.csv", result.pareto.to_csv(index=False))
    recs = pd.DataFrame(result.recommendations)
    write_text(out / "recommendations.csv", recs.to_csv(index=False))
    cols = SUMMARY_COLUMNS
    md = [f"# KD-NAS search\n\nteacher latency: {teacher_ms:.2f} ms\n", "## Leaderboard\n",
          markdown_table(result.leaderboard[cols]), "\n## Pareto front (KD loss vs latency)\n",
          markdown_table(result.pareto[cols]), "\n## Recommendations per budget\n",
          markdown_table(recs.drop(columns=["arch_id"])), ""]
    write_text(out / "report.md", "\n".join(md))
    pareto_plot(result, out / "pareto.png")


def pareto_plot(result: SearchResult, path: Path) -> Path:
    """Latency vs KD loss of every candidate, the Pareto front, each budget as a vertical line
    and the student recommended for it circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lb, front = result.leaderboard, result.pareto
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(lb["latency_ms"], lb["kd_loss"], s=18, c="tab:gray", label="candidates")
    ax.plot(front["latency_ms"], front["kd_loss"], "-o", c="tab:blue", ms=5, label="Pareto front")
    for i, rec in enumerate(result.recommendations):
        color = f"C{(i + 1) % 10}"
        ax.axvline(rec["budget_ms"], ls="--", lw=1, c=color, label=f"budget {rec['budget']}")
        if rec["arch"]:
            ax.scatter([rec["latency_ms"]], [rec["kd_loss"]], s=160, facecolors="none", edgecolors=color, lw=2)
            ax.annotate(rec["arch"], (rec["latency_ms"], rec["kd_loss"]), fontsize=7, xytext=(4, 6), textcoords="offset points")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("normalised KD loss L_HS (lower is better)")
    ax.set_title("KD-NAS candidates")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
