"""How one encoder scores on a task, kept per item (a prediction per test text, a rank per query, a
cosine per pair, a cluster per text) so that teacher, student and floor can be bootstrapped in
pairs over the same items; the tasks themselves are read in ``downstream``.

- classification: a linear probe fitted on the train split (accuracy, macro-F1);
- retrieval: each query ranked against the pool of every positive (MRR, recall@1, recall@10);
- similarity: Spearman correlation of the pair's cosine with its graded score;
- clustering: V-measure of k-means (k = number of labels) against the labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kdnas_core.config import ProbeConfig
from kdnas_core.errors import EvalError
from kdnas_core.evaluation.downstream import Encode, Task

# --------------------------------------------------------------------------------------------
# Outcomes: per-item results that any resample of the items can be scored on
# --------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Classification: a prediction per test text."""

    predictions: np.ndarray
    labels: np.ndarray
    n_classes: int
    metrics = ("accuracy", "macro_f1")
    primary = "accuracy"

    @property
    def accuracy(self) -> float:
        return self.metric("accuracy")

    @property
    def macro_f1(self) -> float:
        return self.metric("macro_f1")

    def __len__(self) -> int:
        return len(self.labels)

    def items(self) -> np.ndarray:
        return self.labels

    def metric(self, name: str, idx: np.ndarray | None = None) -> float:
        y, p = (self.labels, self.predictions) if idx is None else (self.labels[idx], self.predictions[idx])
        if name == "accuracy":
            return float((y == p).mean())
        if name == "macro_f1":
            return macro_f1(y, p, self.n_classes)
        raise EvalError(f"unknown metric {name!r}: expected one of {', '.join(self.metrics)}")


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y`` or ``pred``."""
    tp = np.bincount(y[pred == y], minlength=n_classes).astype(float)
    n_true = np.bincount(y, minlength=n_classes).astype(float)
    n_pred = np.bincount(pred, minlength=n_classes).astype(float)
    present = (n_true + n_pred) > 0
    f1 = np.divide(2 * tp, n_true + n_pred, out=np.zeros(n_classes), where=present)
    return float(f1[present].mean())


@dataclass
class Ranks:
    """Retrieval: the 0-based rank of each query's own positive among every positive."""

    ranks: np.ndarray
    # The embeddings the ranks came from, kept for drop-in retrieval (another model's queries
    # against this model's positives).
    queries: np.ndarray | None = field(default=None, repr=False, compare=False)
    positives: np.ndarray | None = field(default=None, repr=False, compare=False)
    metrics = ("mrr", "recall@1", "recall@10")
    primary = "mrr"

    def __len__(self) -> int:
        return len(self.ranks)

    def items(self) -> np.ndarray:
        return np.arange(len(self.ranks))

    def metric(self, name: str, idx: np.ndarray | None = None) -> float:
        r = self.ranks if idx is None else self.ranks[idx]
        if name == "mrr":
            return float((1.0 / (r + 1)).mean())
        if name.startswith("recall@"):
            return float((r < int(name.split("@")[1])).mean())
        raise EvalError(f"unknown metric {name!r}: expected one of {', '.join(self.metrics)}")


@dataclass
class Cosines:
    """Similarity: the cosine of each pair next to its graded score."""

    cosines: np.ndarray
    gold: np.ndarray
    metrics = ("spearman",)
    primary = "spearman"

    def __len__(self) -> int:
        return len(self.gold)

    def items(self) -> np.ndarray:
        return self.gold

    def metric(self, name: str, idx: np.ndarray | None = None) -> float:
        from scipy.stats import spearmanr

        if name != "spearman":
            raise EvalError(f"unknown metric {name!r}: expected spearman")
        c, g = (self.cosines, self.gold) if idx is None else (self.cosines[idx], self.gold[idx])
        if np.ptp(g) == 0 or np.ptp(c) == 0:
            return 0.0
        return float(spearmanr(c, g).statistic)


@dataclass
class Clusters:
    """Clustering: the k-means cluster of each text next to its label."""

    assigned: np.ndarray
    labels: np.ndarray
    metrics = ("v_measure",)
    primary = "v_measure"

    def __len__(self) -> int:
        return len(self.labels)

    def items(self) -> np.ndarray:
        return self.labels

    def metric(self, name: str, idx: np.ndarray | None = None) -> float:
        from sklearn.metrics import v_measure_score

        if name != "v_measure":
            raise EvalError(f"unknown metric {name!r}: expected v_measure")
        a, y = (self.assigned, self.labels) if idx is None else (self.assigned[idx], self.labels[idx])
        return float(v_measure_score(y, a))


Outcome = Scores | Ranks | Cosines | Clusters


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_ranks(queries: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Rank of positive i for query i among all positives by cosine (ties count against)."""
    q, p = _unit(queries), _unit(positives)
    ranks = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), 1024):  # blocks keep memory at 1024 x pool
        sim = q[start:start + 1024] @ p.T
        own = sim[np.arange(sim.shape[0]), np.arange(start, start + sim.shape[0])]
        ranks[start:start + sim.shape[0]] = (sim >= own[:, None]).sum(1) - 1
    return ranks


def one_blas_thread():
    """A context in which BLAS runs on one thread. The probe and k-means multiply matrices of a
    few hundred rows; OpenBLAS's threads cost more than they share out on them, and on a 2-core
    box the demo student's probe ran 12x faster on one (11.1 s -> 0.9 s) and its k-means 7x
    (2.5 s -> 0.34 s), with the same predictions and clusters. torch keeps its own threads."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def kmeans_clusters(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means on unit vectors (cosine geometry, as embeddings are used)."""
    from sklearn.cluster import KMeans

    with one_blas_thread():
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(_unit(x))


def score_task(task: Task, encode: Encode, probe: ProbeConfig | None = None, seed: int = 0) -> Outcome:
    """One encoder's outcome on one task, from its embeddings only."""
    if task.kind == "classification":
        return linear_probe(encode(task.train_texts), task.train_labels, encode(task.test_texts), task.test_labels,
                            task.n_classes, probe, seed)
    if task.kind == "retrieval":
        q, p = encode(task.queries), encode(task.positives)
        return Ranks(retrieval_ranks(q, p), q, p)
    if task.kind == "similarity":
        a, b = _unit(encode(task.text1)), _unit(encode(task.text2))
        return Cosines((a * b).sum(1).astype(np.float64), task.scores)
    return Clusters(kmeans_clusters(encode(task.texts()), len(task.classes), seed), task.labels)


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

    with warnings.catch_warnings(), one_blas_thread():
        # An unconverged lbfgs after max_iter is still a fitted probe; the score says how good.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(train_x, train_y)
        predictions = clf.predict(test_x)
    return Scores(predictions.astype(np.int64), test_y, n_classes)
