"""Tasks of the Massive Text Embedding Benchmark as kdnas task rows (``source: mteb``).

Needs the optional ``mteb`` package and the hub (or MTEB's local cache). The task's first
language subset and first evaluation split are read and turned into kdnas's columns; the
scoring is kdnas's own (a linear probe; each query against the pool of every query's most
relevant document), so numbers are comparable between kdnas rows, not with MTEB's leaderboard.
"""

from __future__ import annotations

import pandas as pd

from kdnas_core.config import EvalTaskConfig
from kdnas_core.errors import EvalError

KINDS = {"STS": "similarity", "Classification": "classification", "Clustering": "clustering", "Retrieval": "retrieval"}


def _split(task, where: str):
    data = task.dataset
    split = task.metadata.eval_splits[0]
    if split not in data:  # multilingual tasks: subset -> split
        subset = next(iter(data))
        data = data[subset]
    if split not in data:
        raise EvalError(f"{where}: MTEB task {task.metadata.name} has no {split!r} split in its data")
    return data[split]


def _retrieval_frame(split) -> pd.DataFrame:
    """Each query with its most relevant document."""
    corpus = {row["id"]: " ".join(x for x in (row.get("title"), row.get("text")) if x) for row in split["corpus"]}
    queries = {row["id"]: row["text"] for row in split["queries"]}
    rows = []
    for qid, docs in split["relevant_docs"].items():
        if qid in queries and docs:
            best = max(docs, key=docs.get)
            if best in corpus:
                rows.append((queries[qid], corpus[best]))
    return pd.DataFrame(rows, columns=["query", "positive"])


def _column_frame(task, split, kind: str) -> pd.DataFrame:
    if kind == "similarity":
        a, b = task.column_names
        return pd.DataFrame({"text1": split[a], "text2": split[b], "score": split["score"]})
    text, label = split[task.input_column_name], split[task.label_column_name]
    if text and isinstance(text[0], list):  # legacy clustering: each row is one set of texts
        text, label = text[0], label[0]
    return pd.DataFrame({"text": text, "label": label})


def mteb_rows(t: EvalTaskConfig, where: str) -> pd.DataFrame:
    """The task's rows in kdnas's columns for its kind; every failure is one line."""
    try:
        import mteb
    except ImportError:
        raise EvalError(f"{where}: source 'mteb' needs the mteb package: pip install 'kdnas[mteb]'") from None
    try:
        task = mteb.get_task(t.path)
    except Exception as err:  # unknown names raise KeyError or ValueError depending on version
        raise EvalError(f"{where}.path = {t.path!r}: not an MTEB task ({str(err).splitlines()[0][:200]})") from None
    kind = KINDS.get(task.metadata.type)
    if kind is None:
        raise EvalError(f"{where}: MTEB task {t.path} is of type {task.metadata.type}; kdnas scores "
                        f"{', '.join(KINDS)} tasks")
    if kind != t.kind:
        raise EvalError(f"{where}: MTEB task {t.path} is a {kind} task, not {t.kind} (set {where}.kind: {kind})")
    try:
        task.load_data()
    except Exception as err:  # network, hub and cache errors come in many types
        raise EvalError(f"{where}: cannot load MTEB task {t.path} (offline, and not in MTEB's cache?): "
                        f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None
    split = _split(task, where)
    return _retrieval_frame(split) if kind == "retrieval" else _column_frame(task, split, kind)
