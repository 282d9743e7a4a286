"""Benchmark: the evaluation's scikit-learn steps with BLAS's default threads against one thread.

    python -m bench.eval_threads [--config configs/default.yaml] [--repeats 3]
    python -m bench.eval_threads --smoke      # a tiny random teacher: correctness only

The teacher's embeddings of the config's classification and clustering tasks are computed once;
then the logistic-regression probe (``scoring.linear_probe``) and k-means
(``scoring.kmeans_clusters``) run on them with BLAS left at its default threads and with one
thread (``scoring.one_blas_thread``, what kdnas does), taking turns ``--repeats`` times. Reported:
median seconds of each, their ratio, and whether the two give the same predictions and clusters.
"""

from __future__ import annotations

from bench.common import RUNS_BENCH, ROOT, add_common_args, argv_of, header, out_folder, publish, smoke_config

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from kdnas_core.config import config_from_dict  # noqa: E402
from kdnas_core.evaluation import scoring  # noqa: E402
from kdnas_core.evaluation.evaluate import embed  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.sentence import SentenceEncoder  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def steps(ws: Workspace):
    """(name, run) for the probe of each classification task and k-means of each clustering
    task, on the teacher's embeddings; ``run()`` returns the predictions or cluster labels."""
    cfg, teacher = ws.cfg, ws.teacher
    model = SentenceEncoder(teacher.model, teacher.head.without_dense())

    def encode(texts):
        return embed(model, teacher.tokenizer, texts, cfg.evaluate.max_length or cfg.data.max_length,
                     cfg.evaluate.batch_size, None, False, "embed")

    out = []
    for t in ws.tasks:
        if t.kind == "classification":
            tx, sx = encode(t.train_texts), encode(t.test_texts)
            out.append((f"probe: {t.label} ({len(tx)} x {tx.shape[1]})", lambda t=t, tx=tx, sx=sx: scoring.linear_probe(
                tx, t.train_labels, sx, t.test_labels, t.n_classes, cfg.evaluate.probe, cfg.seed).predictions))
        elif t.kind == "clustering":
            x = encode(t.texts())
            out.append((f"k-means: {t.label} ({len(x)} x {x.shape[1]}, k = {len(t.classes)})",
                        lambda t=t, x=x: scoring.kmeans_clusters(x, len(t.classes), cfg.seed)))
    return out


def measure(run, repeats: int) -> dict:
    """``run`` with BLAS at its default threads (the one-thread context swapped for a no-op) and
    as kdnas runs it, taking turns."""
    times = {"default": [], "one": []}
    results = {}
    kdnas_context = scoring.one_blas_thread
    for _ in range(repeats):
        for way in ("default", "one"):
            scoring.one_blas_thread = contextlib.nullcontext if way == "default" else kdnas_context
            try:
                t0 = time.perf_counter()
                results[way] = np.asarray(run())
                times[way].append(time.perf_counter() - t0)
            finally:
                scoring.one_blas_thread = kdnas_context
    d, o = statistics.median(times["default"]), statistics.median(times["one"])
    return {"default_threads_s": round(d, 3), "one_thread_s": round(o, 3), "speedup": round(d / o, 2),
            "same_result": bool(np.array_equal(results["default"], results["one"]))}


def main(argv: list[str] | None = None) -> None:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--repeats", type=int, default=None, help="turns of each (default 3; --smoke 1)")
    add_common_args(p, RUNS_BENCH, "a tiny random teacher")
    args = p.parse_args(argv)
    out = out_folder(args.out, args.smoke, RUNS_BENCH)
    raw = smoke_config(out / "work") if args.smoke else yaml.safe_load((ROOT / args.config).read_text())
    cfg = config_from_dict(raw, "smoke" if args.smoke else args.config)
    ws = Workspace.prepare(cfg)
    repeats = args.repeats or (1 if args.smoke else 3)
    rows = [{"step": name, **measure(run, repeats)} for name, run in steps(ws)]
    from threadpoolctl import threadpool_info

    blas = ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info())
    lines = [*header("Evaluation steps: BLAS default threads vs one", __file__, argv, cfg), "",
             f"- teacher {cfg.teacher.name}'s embeddings; median of {repeats} turns each; thread pools at their "
             f"defaults: {blas}", "", markdown_table(pd.DataFrame(rows)), ""]
    publish("\n".join(lines), out / "eval_threads.md")


if __name__ == "__main__":
    main()
