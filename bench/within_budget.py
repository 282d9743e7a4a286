"""Which quality signal orders students **within one latency budget** like their final result?

    python -m bench.within_budget --config configs/benchmark.yaml --budget 0.1x        # mpnet-base
    python -m bench.within_budget --config configs/multilingual.yaml --budget 0.2x     # me5-small
    python -m bench.within_budget --smoke       # a tiny random teacher: correctness only

A search only ever compares candidates of similar cost: across the whole space every signal
mostly measures size (bench/results/proxy-rank-12.md: tau 0.76 for the proxy loss, 0.79 for
counting parameters). So this takes ``--archs`` students whose *measured* latency lies within
±25 % of the budget, chosen to differ (deep-narrow, shallow-wide, FFN-heavy, head counts: the
farthest apart in shape among those the latency predictor puts near the budget), and for each:

1. the zero-cost signals of the student as cut from the teacher (``search.signals``);
2. the proxy distillation exactly as the search runs it, and the signals after it;
3. the final distillation with the final recipe (one shared teacher-state cache, as
   bench.headline), scored on the config's evaluation tasks against its untrained floor.

The report gives Kendall tau between each signal (signed so that + means "ranks like the final
summary") and the final summary, with a bootstrap 95 % interval over the students; parameter
count and latency are the baselines a signal must beat. With ``--mix`` (English teachers) the
final students are distilled on the general mix, as the scale curve. Work files go to
runs/within-budget-<teacher>/ so a rerun resumes.
"""

from __future__ import annotations

from bench.common import GENERAL_MIX, RESULTS, ROOT, add_common_args, argv_of, final_distilled, header, out_folder, \
    publish, smoke_config

import argparse  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.evaluation.evaluate import compare, evaluate_model  # noqa: E402
from kdnas_core.latency import LatencyPredictor, count_params, predictor_error  # noqa: E402
from kdnas_core.search.candidates import ProxyEvaluator, ProxyResult, latency_profile, teacher_latency  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.reward import parse_budget  # noqa: E402
from kdnas_core.search.signals import HIGHER_IS_BETTER, SIGNALS  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402

BAND = 0.25  # students within ±25 % of the budget's latency (--band)


def shape_vector(a: StudentArch) -> np.ndarray:
    """Where an architecture sits in shape: depth, width, FFN ratio, head width (log scales)."""
    return np.array([math.log2(a.layers), math.log2(a.hidden), math.log2(a.ffn / a.hidden),
                     math.log2(a.hidden / a.heads)])


def pick_within_budget(ws: Workspace, budget_ms: float, n: int, seed: int, pool_size: int = 3000,
                       seed_archs: int = 6, band: float = BAND) -> tuple[list[tuple[StudentArch, float]], pd.DataFrame]:
    """``n`` architectures whose measured latency is within ±``band`` of ``budget_ms``, as far apart
    in shape as possible. A latency predictor, refitted after every measurement, proposes the
    next one among those it puts within the band; the table lists every measurement with the
    prediction made before it (the predictor's error as the search would see it)."""
    rng = random.Random(seed)
    pool = list({a.arch_id: a for a in (ws.space.sample(rng) for _ in range(pool_size))}.values())
    b, s = ws.cfg.latency.reward_shape
    t = ws.teacher.config
    by_size = sorted(pool, key=lambda a: count_params(a, t.vocab_size, t.max_position_embeddings)["encoder"])
    measured: dict[str, float] = {}
    log = []

    def measure(a: StudentArch, predicted: float | None) -> float:
        ms = latency_profile(ws, a).latency_ms
        measured[a.arch_id] = ms
        log.append({"arch": a.name, "predicted_ms": predicted, "measured_ms": ms, "ratio_to_budget": ms / budget_ms})
        print(f"latency {a.name}: {ms:.2f} ms ({ms / budget_ms:.2f}x the budget)", flush=True)
        return ms

    for i in range(seed_archs):  # spread by size, to fit the first predictor
        measure(by_size[round(i * (len(by_size) - 1) / (seed_archs - 1))], None)
    kept: list[tuple[StudentArch, float]] = [(a, measured[a.arch_id]) for a in pool
                                             if a.arch_id in measured and abs(measured[a.arch_id] / budget_ms - 1) <= band]
    by_id = {a.arch_id: a for a in pool}
    for _ in range(6 * n):
        if len(kept) >= n:
            break
        archs = [by_id[i] for i in measured]
        pred = LatencyPredictor.fit(archs, [measured[a.arch_id] for a in archs], b, s, ws.cfg.latency.reward_backend)
        near = [a for a in pool if a.arch_id not in measured and abs(pred.predict(a) / budget_ms - 1) <= 0.8 * band]
        if not near:
            break
        chosen = np.array([shape_vector(a) for a, _ in kept]) if kept else None
        # Farthest from every kept shape (the first: a seeded random one).
        nxt = rng.choice(near) if chosen is None else max(
            near, key=lambda a: float(np.min(np.linalg.norm(chosen - shape_vector(a), axis=1))))
        ms = measure(nxt, pred.predict(nxt))
        if abs(ms / budget_ms - 1) <= band:
            kept.append((nxt, ms))
    return kept, pd.DataFrame(log)


def kendall_with_interval(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Kendall tau of x and y, with a 95 % bootstrap interval over the students (pairs resampled
    together; draws where either side is constant are skipped)."""
    from scipy.stats import kendalltau

    tau = float(kendalltau(x, y).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            draws.append(kendalltau(x[i], y[i]).statistic)
    lo, hi = (np.nanpercentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    return tau, float(lo), float(hi)


def noise_ceiling(summary: np.ndarray, se: np.ndarray, n_draws: int = 2000, seed: int = 0) -> float:
    """The Kendall tau a perfect signal would reach against the measured summary: each student's
    summary is only known to its evaluation SE, so an oracle ranking the students by their true
    summaries meets the measured order with noise. Estimated as the mean tau between the summaries
    and the summaries redrawn with N(0, SE) each (the measured ones standing in for the true ones).
    Where it sits near the target, no signal can be shown to reach it with these tasks."""
    from scipy.stats import kendalltau

    rng, se = np.random.default_rng(seed), np.nan_to_num(se)
    return float(np.mean([kendalltau(summary, summary + rng.normal(0.0, se)).statistic for _ in range(n_draws)]))


def correlations(df: pd.DataFrame, target: str = "summary", moments: tuple[str, ...] = ("zc", "proxy")) -> pd.DataFrame:
    rows = []
    candidates = [f"{m}_{s}" for m in moments for s in SIGNALS] + ["params_m", "latency_ms"]
    for col in candidates:
        if col not in df or df[col].isna().any():
            continue
        sign = 1 if col.split("_", 1)[-1] in HIGHER_IS_BETTER or col in ("params_m", "latency_ms") else -1
        tau, lo, hi = kendall_with_interval(sign * df[col].to_numpy(float), df[target].to_numpy(float))
        rows.append({"signal": col, "kendall_tau": round(tau, 3), "ci95_lo": round(lo, 3), "ci95_hi": round(hi, 3)})
    return pd.DataFrame(rows).sort_values("kendall_tau", ascending=False).reset_index(drop=True)


def make_config(args, work: Path):
    import yaml

    base = smoke_config(work) if args.smoke else yaml.safe_load((ROOT / args.config).read_text())
    overrides = {"paths.output_dir": str(work), "data.train_size": args.train_texts,
                 "distill.final.epochs": args.final_epochs, "tracking.enabled": False}
    if args.mix and not args.smoke:
        overrides |= {"data.source": "mix", "data.path": None, "data.mix": GENERAL_MIX}
    return config_from_dict(apply_overrides(base, overrides), "smoke" if args.smoke else args.config)


def proxy_distilled(ev: ProxyEvaluator, arch: StudentArch, folder: Path) -> ProxyResult:
    """``ev.distill(arch)``, kept under ``folder`` by the config's proxy key and the arch_id, so
    that a resumed run does not repeat ten proxy runs (about 3 minutes each for mpnet-base)
    before it reaches the scoring it stopped in, and a changed proxy recipe is not read back."""
    import json

    from kdnas_core.files.atomic import write_json
    from kdnas_core.keys import key

    path = folder / key("proxy", ev.ws.cfg) / f"{arch.arch_id}.json"
    if path.is_file():
        return ProxyResult.from_dict(json.loads(path.read_text()))
    proxy = ev.distill(arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, proxy.to_dict())
    return proxy


def score_students(ws: Workspace, rows: list[dict], models: dict, floors: dict) -> None:
    cfg = ws.cfg
    e, max_len = cfg.evaluate, cfg.evaluate.max_length or cfg.data.max_length
    cache = cfg.paths.cache_path() / "embeddings"
    teacher = ws.teacher_eval
    for r in rows:
        print(f"evaluating {r['arch']}", flush=True)
        ev = evaluate_model(models[r["arch"]], ws.teacher.tokenizer, r["arch"], ws.tasks, ws.fidelity_texts, e,
                            max_len, cache, cfg.seed)
        fl = evaluate_model(floors[r["arch"]], ws.teacher.tokenizer, f"{r['arch']} floor", ws.tasks,
                            ws.fidelity_texts, e, max_len, cache, cfg.seed)
        c = compare(ev, teacher, fl, e, cfg.seed)
        r |= {"summary": c["summary"], "summary_se": c["summary_se"], "dropin": c.get("dropin")}


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/benchmark.yaml")
    ap.add_argument("--budget", default=None, help="the latency budget (default 0.1x; --smoke 0.9x)")
    ap.add_argument("--archs", type=int, default=None, help="students within the budget (default 10; --smoke 3)")
    ap.add_argument("--train-texts", type=int, default=None, help="final distillation texts (default 4000)")
    ap.add_argument("--final-epochs", type=int, default=2)
    ap.add_argument("--mix", action="store_true", help="final students distilled on the general English mix")
    ap.add_argument("--seed", type=int, default=0, help="which architectures are drawn")
    ap.add_argument("--band", type=float, default=None,
                    help=f"students within ±band x the budget (default {BAND}; --smoke 0.9: a tiny teacher's latencies are noise)")
    add_common_args(ap, RESULTS, "a tiny random teacher")
    args = ap.parse_args(argv)
    args.budget = args.budget or ("0.9x" if args.smoke else "0.1x")
    args.archs = args.archs or (3 if args.smoke else 10)
    args.train_texts = args.train_texts or (64 if args.smoke else 4000)
    args.band = args.band or (0.9 if args.smoke else BAND)
    out = out_folder(args.out, args.smoke, RESULTS)
    work = out / "work" if args.smoke else ROOT / "runs" / f"within-budget-{Path(args.config).stem}"
    cfg = make_config(args, work)
    teacher_label = "smoke" if args.smoke else cfg.teacher.name
    ws = Workspace.prepare(cfg).validate()
    b, s = cfg.latency.reward_shape
    teacher_ms = teacher_latency(ws).median(cfg.latency.reward_backend, b, s)
    budget_ms = parse_budget(args.budget).ms(teacher_ms)
    picked, lat_log = pick_within_budget(ws, budget_ms, args.archs, args.seed,
                                         pool_size=200 if args.smoke else 3000, seed_archs=3 if args.smoke else 6,
                                         band=args.band)
    if len(picked) < 2:
        raise SystemExit(f"only {len(picked)} architectures measured within ±{args.band:.0%} of {budget_ms:.2f} ms")
    ev = ProxyEvaluator(ws)
    probe = ev.probe  # the same held-out texts and teacher embeddings for both moments
    t = ws.teacher.config
    rows, models, floors = [], {}, {}
    layers = ws.layers_for(sorted({a.layers for a, _ in picked}), "final")
    states, eval_states = ws.cached_states("train", layers), ws.eval_states(layers)
    batches = ws.distill_batches("train", states)  # the same for every student (neighbours: one k-means)
    for arch, ms in picked:
        print(f"--- {arch.name} ({ms:.2f} ms)", flush=True)
        zc = probe.zero_cost(arch)
        proxy = proxy_distilled(ev, arch, work / "proxy")
        start = ws.start_student(arch)
        model, result = final_distilled(ws, start.model, batches, states, eval_states, start.init_heads,
                                        work / "students" / arch.arch_id)
        models[arch.name], floors[arch.name] = model, ws.untrained_student(arch, cfg.seed)
        rows.append({"arch": arch.name, "latency_ms": round(ms, 2), "ratio_to_budget": round(ms / budget_ms, 3),
                     "params_m": round(count_params(arch, t.vocab_size, t.max_position_embeddings)["encoder"] / 1e6, 2),
                     **{f"zc_{k}": zc.to_dict()[k] for k in SIGNALS}, "zc_seconds": zc.seconds,
                     **{f"proxy_{k}": proxy.signals.get(k) for k in SIGNALS}, "proxy_seconds": proxy.distill_s,
                     "final_best_step": result.get("best_step"), "final_eval_loss": result.get("final_eval_loss")})
    score_students(ws, rows, models, floors)
    df = pd.DataFrame(rows)
    corr = correlations(df)
    stem = out / f"within-budget-{teacher_label}"
    df.to_csv(stem.with_suffix(".csv"), index=False)
    lat = lat_log.dropna(subset=["predicted_ms"])
    err = predictor_error(lat.predicted_ms, lat.measured_ms) if len(lat) > 2 else {}
    md = [*header(f"Quality signals within one budget: {cfg.teacher.name}, {args.budget}", __file__, argv, cfg), "",
          f"- budget {args.budget} = {budget_ms:.2f} ms (teacher {teacher_ms:.2f} ms, {cfg.latency.reward_backend} "
          f"{b}x{s}); {len(df)} students measured within ±{args.band:.0%}, drawn to differ in shape (seed {args.seed})",
          f"- final recipe: {cfg.data.source} corpus, {len(ws.splits.train)} texts x {cfg.distill.final.epochs} "
          f"epochs, one shared teacher-state cache; proxy: {len(ws.splits.proxy)} texts x "
          f"{cfg.distill.proxy.epochs} epochs as the search runs it",
          f"- signals on {len(probe.texts)} held-out corpus texts ({len(probe.pairs)} translation pairs); zero-cost = "
          "the student as cut from the teacher, no training step",
          "- tau: Kendall, signal signed so that + = ranks like the final summary; 95 % interval: bootstrap over "
          "the students",
          f"- noise ceiling: {noise_ceiling(df.summary.to_numpy(float), df.summary_se.to_numpy(float)):.2f}, the "
          "tau a signal that knew each student's true summary would reach against the measured one (each summary "
          "redrawn with its SE)",
          f"- latency predictor while picking (refitted after each measurement): {err}" if err else "",
          "", "## Rank correlation with the final summary", "", markdown_table(corr), "",
          "## Students", "", markdown_table(df), "", "## Latency measurements while picking", "",
          markdown_table(lat_log.round(3)), ""]
    return publish("\n".join(md), stem.with_suffix(".md"))


if __name__ == "__main__":
    main()
