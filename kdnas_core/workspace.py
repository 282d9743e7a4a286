"""What every job of a search shares: the teacher, the splits, tokenised texts and cached teacher
states, built once per process."""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from kdnas_core.files.atomic import check_free_space, write_json
from kdnas_core.config import KDNASConfig, TrainBudget
from kdnas_core.data import (
    Batch,
    Splits,
    TokenizedTexts,
    length_bucketed_batches,
    load_splits,
    neighbour_batches,
    tokenize,
)
from kdnas_core.distill import (
    CachedTeacherStates,
    SharedStates,
    SourceTargets,
    TeacherStates,
    cache_bytes,
    cache_plan,
    make_teacher_states,
    pooled_only,
    source_embeddings,
    teacher_embeddings,
    teacher_layers_needed,
)
from kdnas_core.errors import ArchError, ConfigError, DataError
from kdnas_core.evaluation.downstream import Task, load_tasks
from kdnas_core.evaluation.evaluate import ModelEval, evaluate_model
from kdnas_core.inherit import (
    IMPORTANCE_VERSION,
    Importance,
    InheritedSelection,
    build_inherited,
    compute_importance,
    init_projections,
    select_layers,
    select_width,
    student_config_like,
    supports_inheritance,
)
from kdnas_core.progress import Progress
from kdnas_core.search.space import SearchSpace, StudentArch
from kdnas_core.sentence import SentenceEncoder
from kdnas_core.student import build_student, check_fits_in_memory, untrained_floor
from kdnas_core.teachers.loading import Teacher, load_teacher


def distill_path(split: str) -> Literal["proxy", "final"]:
    """Which distillation runs on ``split``: the final one on "train", the proxy's on any other."""
    return "final" if split == "train" else "proxy"


@dataclass
class StudentStart:
    """A student before distillation, and how its loss's projection heads start (None: at zero)."""

    model: nn.Module
    init_heads: Callable[[nn.Module], None] | None = None


@dataclass
class Workspace:
    cfg: KDNASConfig
    teacher: Teacher
    _tokens: dict[str, TokenizedTexts] = field(default_factory=dict)
    # Where teacher-state caches are shared with other machines (set by the orchestration
    # layer from paths.shared_cache; None: this machine's cache folder only).
    shared_states: SharedStates | None = None
    _teacher_eval: ModelEval | None = field(default=None, repr=False)
    # Per split: the teacher's embeddings of each text's source sentence (translation_targets).
    _sources: dict[str, tuple] = field(default_factory=dict, repr=False)

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
        extra = cfg.student.vocab_texts
        if cfg.student.vocab == "corpus" and extra and not Path(extra).expanduser().is_file():
            raise ConfigError(f"student.vocab_texts = {extra!r}: no such file")
        self.space  # noqa: B018 - a search space the teacher leaves empty fails here, before any timing
        self.check_state_room()
        return self

    def check_state_room(self) -> None:
        """The final distillation's teacher states, planned now rather than after the search:
        over distill.cache_max_gb they will run live (said once, here), a forced cache over it is
        refused, and a cache that the disk cannot hold fails in one line (needed vs free)."""
        d = self.cfg.distill.recipe("final")
        if pooled_only(d.weights):  # a vector a text: nothing to plan
            return
        passes = _passes(d.final, math.ceil(len(self.splits.train) / self.cfg.data.batch_size))
        relation = self.teacher.num_layers if d.weights.attention_relation > 0 else None
        n_tokens = sum(self.tokens("train").lengths)
        # The deepest student maps the most teacher layers: the largest cache one student needs.
        layers = max((self.layers_for([n], "final") for n in self.space.layers), key=len)
        use, notice = cache_plan(d, math.ceil(passes), n_tokens, layers, self.teacher.hidden, relation)
        if notice:
            warnings.warn(notice)
        root = self.state_cache_root
        built = (root / CachedTeacherStates.cache_key(self.teacher, self.tokens("train"), layers, relation)).exists()
        if use and d.cache_on_disk and not built:  # (free space is read on the nearest existing parent)
            check_free_space(root, cache_bytes(n_tokens, layers, self.teacher.hidden, relation),
                             "the final distillation's teacher states (distill.cache_max_gb)")

    def check_tasks(self) -> Workspace:
        """Read the downstream tasks now, when a search starts: a task that cannot be read fails
        in one line before the first distillation, not after the last."""
        if self.cfg.evaluate.enabled:
            self.tasks  # noqa: B018 - read and cached
        return self

    @functools.cached_property
    def splits(self) -> Splits:
        # Lazy: latency profiling needs the teacher but no text.
        return load_splits(self.cfg.data, self.cfg.seed)

    @functools.cached_property
    def space(self) -> SearchSpace:
        return SearchSpace(self.cfg.search_space, self.teacher.shape, inherits=self.inheritance is None)

    @property
    def state_cache_root(self) -> Path:
        return self.cfg.paths.cache_path() / "teacher_states"

    def texts(self, split: str) -> list[str]:
        """The texts of ``split`` that are distilled on or scored, in token order."""
        texts = self.splits.get(split)
        if split == "eval":  # the held-out KD loss needs only a slice of the eval split
            texts = texts[: self.cfg.distill.eval_batches * self.cfg.data.batch_size]
        return texts

    def tokens(self, split: str) -> TokenizedTexts:
        if split not in self._tokens:
            self._tokens[split] = tokenize(self.texts(split), self.teacher.tokenizer, self.cfg.data.max_length)
        return self._tokens[split]

    def _with_sources(self, split: str, states: TeacherStates, progress: Progress) -> TeacherStates:
        """``states`` whose pooled targets are the sources' embeddings (data.translation_targets)."""
        if not self.cfg.data.translation_targets:
            return states
        if split not in self._sources:
            self._sources[split] = source_embeddings(self.teacher, self.texts(split), self.splits.sources,
                                                     self.cfg.data.max_length, self.teacher.head.pooling,
                                                     progress=progress)
        return SourceTargets(states, *self._sources[split])

    def batches(self, split: str, seed: int | None = None) -> list[Batch]:
        shuffle = split != "eval"
        seed = self.cfg.seed if seed is None else seed
        return length_bucketed_batches(self.tokens(split), self.cfg.data.batch_size, seed, shuffle)

    def layers_for(self, student_layers: list[int] | tuple[int, ...], path: Literal["proxy", "final"] = "proxy"
                   ) -> tuple[int, ...]:
        """The teacher layers a distillation on ``path`` of students this deep reads (its loss's
        weights decide: the final path may match the pooled embedding alone)."""
        d = self.cfg.distill.recipe(path)
        return teacher_layers_needed(student_layers, self.teacher.num_layers, d.mapping, d.weights)

    def teacher_states(self, split: str, layers: tuple[int, ...], passes: float, progress: Progress = True) -> TeacherStates:
        # Standardisation statistics for a live teacher come from the first few training batches.
        stats_batches = self.batches(split)[:20]
        states = make_teacher_states(
            self.teacher, self.tokens(split), layers, self.cfg.distill.recipe(distill_path(split)),
            self.state_cache_root, math.ceil(passes), stats_batches, progress, self.shared_states,
            self.teacher.head.pooling,
        )
        return self._with_sources(split, states, progress)

    def distill_inputs(self, split: str, budget: TrainBudget, student_layers: int, progress: Progress = True
                       ) -> tuple[list[Batch], TeacherStates, TeacherStates]:
        """Batches, teacher states and held-out states of a distillation of ``budget`` on ``split``."""
        batches = self.batches(split)
        passes = _passes(budget, len(batches))
        path = distill_path(split)
        layers = self.layers_for([student_layers], path)
        states = self.teacher_states(split, layers, passes, progress)
        return self.distill_batches(split, states, batches, progress), states, self.eval_states(layers, progress)

    def distill_batches(self, split: str, states: TeacherStates, batches: list[Batch] | None = None,
                        progress: Progress = True) -> list[Batch]:
        """The batches a distillation on ``split`` trains on (the final distillation's on "train",
        the proxy's on any other), grouped as that path's batching says."""
        return self.arranged(self.tokens(split), batches or self.batches(split), states, distill_path(split), progress)

    def arranged(self, tokens: TokenizedTexts, batches: list[Batch], states: TeacherStates,
                 path: Literal["proxy", "final"], progress: Progress = True) -> list[Batch]:
        """``batches`` (every text of ``tokens``, as ``states`` indexes them) regrouped as the
        ``path``'s batching (``distill.recipe(path).batching``) says: as they are for "length"."""
        if self.cfg.distill.recipe(path).batching == "length":
            return batches
        vectors = teacher_embeddings(states, batches, self.teacher.head.pooling, progress)
        return neighbour_batches(tokens, vectors, self.cfg.data.batch_size, self.cfg.seed)

    def cached_states(self, split: str, layers: tuple[int, ...], progress: Progress = True) -> TeacherStates:
        """Teacher states of ``split`` computed once (reused from disk when present)."""
        relation = self.teacher.num_layers if self.cfg.distill.weights.attention_relation > 0 else None
        root = self.state_cache_root if self.cfg.distill.cache_on_disk else None
        states = CachedTeacherStates.build(self.teacher, self.tokens(split), layers, relation, root, progress=progress,
                                           shared=self.shared_states if root is not None else None)
        return self._with_sources(split, states, progress)

    def eval_states(self, layers: tuple[int, ...], progress: Progress = True) -> TeacherStates:
        # Evaluated twice per candidate and shared by all of them: always worth caching.
        return self.cached_states("eval", layers, progress)

    @functools.cached_property
    def tasks(self) -> list[Task]:
        """The downstream tasks, their scored texts outside everything a student is distilled on."""
        return read_tasks(self.cfg, self.splits.train)

    @property
    def fidelity_texts(self) -> list[str]:
        """Held-out corpus texts (never distilled on) for the task-free fidelity scores."""
        return self.splits.eval[: self.cfg.evaluate.fidelity_texts]

    def evaluate(self, model, name: str, progress: Progress = True, tokenizer=None) -> ModelEval:
        """``model`` on every task; ``tokenizer``: its own, where it is not the teacher's (a
        corpus-trimmed vocabulary)."""
        e = self.cfg.evaluate
        if not isinstance(model, SentenceEncoder):  # pooled and normalised as the teacher does
            model = SentenceEncoder(model, self.teacher.head.without_dense())
        return evaluate_model(model, tokenizer or self.teacher.tokenizer, name, self.tasks, self.fidelity_texts, e,
                              e.max_length or self.cfg.data.max_length, self.cfg.paths.cache_path() / "embeddings",
                              self.cfg.seed, progress)

    # ---- students

    @functools.cached_property
    def inheritance(self) -> str | None:
        """None when students are cut from the teacher, else why they start as BERT students
        (random init asked for, or a teacher family that cannot be cut), said once."""
        if self.cfg.student.init == "random":
            return "student.init: random"
        reason = supports_inheritance(self.teacher.model)
        if reason is not None:
            warnings.warn(f"students of {self.cfg.teacher.name} start as random BERT students: {reason}")
        return reason

    @functools.cached_property
    def importance(self) -> Importance:
        """Activation importance of the teacher's layers, heads, neurons and dimensions on the
        first ``student.importance_texts`` proxy texts: forward passes only, computed once per
        teacher and text set and kept as JSON under ``<cache_dir>/importance/``."""
        texts = self.splits.proxy[: self.cfg.student.importance_texts]
        tokens = tokenize(texts, self.teacher.tokenizer, self.cfg.data.max_length)
        name = f"{self.teacher.fingerprint}-{tokens.fingerprint}-v{IMPORTANCE_VERSION}.json"
        path = self.cfg.paths.cache_path() / "importance" / name
        if path.is_file():
            try:
                return Importance.from_dict(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError, ArchError):
                pass  # damaged: computed again below
        batches = length_bucketed_batches(tokens, self.cfg.data.batch_size, seed=0, shuffle=False)
        importance = compute_importance(self.teacher.model, batches)
        write_json(path, importance.to_dict())
        return importance

    def build_student(self, arch: StudentArch, bytes_per_param: int = 4, dropout: float | None = None) -> nn.Module:
        """The student ``arch`` as a distillation starts it (see ``start_student``)."""
        return self.start_student(arch, bytes_per_param, dropout).model

    def start_student(self, arch: StudentArch, bytes_per_param: int = 4, dropout: float | None = None) -> StudentStart:
        """The student ``arch`` as a distillation starts it: cut from the teacher
        (``student.init: teacher``: the configured layers, the most important heads, neurons and
        dimensions), with the loss's projection heads starting as that selection; or today's
        random BERT student with zero-initialised heads."""
        cfg = self.cfg
        if self.inheritance is not None:
            model = build_student(arch, self.teacher, seed=cfg.seed, dropout=dropout, bytes_per_param=bytes_per_param)
            return StudentStart(model)
        check_fits_in_memory(arch, self.teacher.config, bytes_per_param)
        selection = self.selection(arch)
        model = build_inherited(self.teacher.model, arch, selection, dropout)
        return StudentStart(model, functools.partial(init_projections, selection=selection, teacher_hidden=self.teacher.hidden))

    def selection(self, arch: StudentArch) -> InheritedSelection:
        """What ``arch`` keeps of the teacher when it is cut from it (``student.init: teacher``):
        the configured layers, the most important heads, neurons and dimensions."""
        layers = select_layers(self.teacher.num_layers, arch.layers, self.cfg.student.layers, self.importance)
        return select_width(self.teacher.model, arch, self.importance, layers)

    def untrained_student(self, arch: StudentArch, seed: int | None = None) -> nn.Module:
        """An untrained student of the model class a distillation would use, every weight random
        (embeddings included): what latency is measured on (weights do not change it), and, with
        a ``seed``, the untrained floor of evaluation tables (``student.untrained_floor``).
        Without one the global generator is left alone, so timing a candidate does not reseed
        the search."""
        if self.inheritance is not None:
            return build_student(arch, self.teacher, seed=seed or 0, init_from_teacher=False)
        from transformers import AutoModel

        check_fits_in_memory(arch, self.teacher.config)
        config = student_config_like(self.teacher.config, arch)
        return AutoModel.from_config(config) if seed is None else untrained_floor(config, seed)

    def teacher_evaluation(self, progress: Progress = True) -> ModelEval:
        """The teacher on every task, evaluated once per workspace."""
        if self._teacher_eval is None:
            teacher = SentenceEncoder(self.teacher.model, self.teacher.head)  # with its own Dense layers, if any
            self._teacher_eval = self.evaluate(teacher, f"teacher {self.cfg.teacher.name}", progress)
        return self._teacher_eval

    @property
    def teacher_eval(self) -> ModelEval:
        return self.teacher_evaluation()


def _passes(budget: TrainBudget, n_batches: int) -> float:
    """How many times a distillation of ``budget`` reads each text (fractional under max_steps)."""
    return budget.epochs if not budget.max_steps else min(budget.epochs, budget.max_steps / max(1, n_batches))


def read_tasks(cfg: KDNASConfig, distilled_texts: list[str]) -> list[Task]:
    """The configured downstream tasks, scored only on texts outside ``distilled_texts``."""
    return load_tasks(cfg.evaluate, cfg.data, distilled_texts, cfg.seed, cfg.paths.cache_path())


def check_writable(path: Path, name: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".kdnas-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{name} = {str(path)!r}: not writable ({err.strerror or type(err).__name__})") from None
