"""Benchmark: cost of one proxy-distillation step, cached teacher states vs a live teacher.

One step = teacher targets + student forward/backward + optimiser step. For each teacher the
same student architecture is distilled on the same proxy batches twice over: once with targets
read from an in-memory teacher-state cache, once with the teacher run on every batch. The
one-off cost of building the cache is timed too, and turned into the number of steps after which
the cache has paid for itself.

Run:  python -m bench.distill_step [--teachers minilm-l6 mpnet-base] [--texts 256]
                                   [--steps 12] [--repeats 3] [--arch L4-H384-A6-F1536-gelu]
      python -m bench.distill_step --smoke     # a tiny random teacher, 2 steps: seconds

Then, on the cached path, where a step's time goes and what the field's CPU levers buy (the
same proxy texts, runs interleaved): tokens per second of the configured step (length-bucketed
batches of 32, fp32, every core) against batches in random order (no bucketing), batches of 16
and 64, bf16 autocast (``distill.precision: bf16``) and one thread; each as a ratio to the
configured step and as a share of this machine's measured fp32 matmul peak (the student's
forward and backward taken as 6 x its non-embedding parameters x tokens FLOPs).

Results are reported as live/cached ratios, not absolute times: on a small shared CPU box the
absolute numbers drift from run to run, but both variants drift together because live and cached
runs are interleaved, so their ratio is what stays meaningful. Target: >= 3x with mpnet-base.
"""

from __future__ import annotations

from bench.common import RUNS_BENCH, ROOT, add_common_args, argv_of, header, out_folder, publish, smoke_config

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import random  # noqa: E402

import torch  # noqa: E402

from kdnas_core.config import apply_overrides, config_from_dict, load_config  # noqa: E402
from kdnas_core.data import collate, length_bucketed_batches  # noqa: E402
from kdnas_core.distill import CachedTeacherStates, LiveTeacherStates, distill  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.student import build_student, count_parameters  # noqa: E402

TARGET_TEACHER, TARGET_SPEEDUP = "mpnet-base", 3.0


def seconds_per_step(ws: Workspace, arch: StudentArch, states, batches, budget, cfg) -> float:
    # A fresh student every run, so no run profits from another's optimiser state or weights.
    student = build_student(arch, ws.teacher, seed=0)
    result = distill(student, states, batches, cfg.distill.recipe("proxy"), budget, seed=0, progress=False)
    return result.seconds / result.steps


def bench_teacher(name: str, args: argparse.Namespace) -> dict:
    # In-memory cache only: a disk cache left by an earlier run would make the build time zero.
    overrides = {"teacher.name": name, "data.proxy_size": args.texts, "distill.cache_on_disk": False}
    if args.smoke:  # the tiny random teacher ("tiny") and its tweets
        base = smoke_config(args.out / "work")
        cfg = config_from_dict(apply_overrides(base, {**overrides, "teacher.name": base["teacher"]["name"]}), "smoke")
    else:
        cfg = load_config(ROOT / "configs/default.yaml", overrides)
    args.configs[name] = cfg
    ws = Workspace.prepare(cfg)
    arch = StudentArch.from_name(args.arch)
    tokens, batches = ws.tokens("proxy"), ws.batches("proxy")
    layers = ws.layers_for([arch.layers])

    t0 = time.perf_counter()
    cache = CachedTeacherStates.build(ws.teacher, tokens, layers, None, None, progress=False)
    build_s = time.perf_counter() - t0
    # Same standardisation statistics, so both variants compute exactly the same loss.
    live = LiveTeacherStates(ws.teacher, layers, None, stats=cache.stats)

    # Warm-up pays for first-call costs (allocator, kernel selection) outside the measurement.
    warm = cfg.distill.proxy.model_copy(update={"max_steps": 2})
    seconds_per_step(ws, arch, live, batches, warm, cfg)
    seconds_per_step(ws, arch, cache, batches, warm, cfg)

    # Interleaved, so slow drift of the machine hits both variants alike.
    budget = cfg.distill.proxy.model_copy(update={"max_steps": args.steps})
    live_s, cached_s = [], []
    for _ in range(args.repeats):
        live_s.append(seconds_per_step(ws, arch, live, batches, budget, cfg))
        cached_s.append(seconds_per_step(ws, arch, cache, batches, budget, cfg))
    live_ms, cached_ms = 1e3 * statistics.median(live_s), 1e3 * statistics.median(cached_s)
    saved_s = (live_ms - cached_ms) / 1e3
    variants, peaks = step_variants(ws, arch, cache, args)
    return {
        "variants": variants,
        "peaks": peaks,
        "teacher": name,
        "params_m": count_parameters(ws.teacher.model) / 1e6,
        "live_ms": live_ms,
        "cached_ms": cached_ms,
        "speedup": live_ms / cached_ms,
        "build_s": build_s,
        "cache_mb": cache.nbytes() / 2**20,
        "break_even": math.ceil(build_s / saved_s) if saved_s > 0 else math.inf,
    }


def matmul_peak(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` on every core (median of ``repeats``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # first-call costs outside the measurement
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def step_variants(ws: Workspace, arch: StudentArch, cache, args) -> tuple[list[dict], dict[str, float]]:
    """Tokens per second of the cached step, as configured and under each lever, interleaved."""
    # The base is fp32 whatever distill.precision says, so every lever is a ratio to fp32.
    cfg = ws.cfg.model_copy(update={"distill": ws.cfg.distill.model_copy(update={"precision": "fp32"})})
    tokens, size, seed = ws.tokens("proxy"), cfg.data.batch_size, cfg.seed
    order = list(range(len(tokens)))
    random.Random(seed).shuffle(order)
    unbucketed = [collate(tokens, order[i:i + size]) for i in range(0, len(order), size)]
    bf16 = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"precision": "bf16"})})
    threads = torch.get_num_threads()
    variants = {  # name: (batches, config, threads)
        f"as configured (length-bucketed, batch {size}, fp32, {threads} threads)": (ws.batches("proxy"), cfg, threads),
        "batches in random order (no length bucketing)": (unbucketed, cfg, threads),
        f"batch {size // 2}": (length_bucketed_batches(tokens, size // 2, seed), cfg, threads),
        f"batch {size * 2}": (length_bucketed_batches(tokens, size * 2, seed), cfg, threads),
        "bf16 autocast (distill.precision: bf16)": (ws.batches("proxy"), bf16, threads),
        "1 thread": (ws.batches("proxy"), cfg, 1),
    }
    budget = cfg.distill.proxy.model_copy(update={"max_steps": args.steps, "epochs": 1000})
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.repeats + 1):  # the first round warms every variant up and is not kept
        for name, (batches, c, n_threads) in variants.items():
            torch.set_num_threads(n_threads)
            try:
                student = build_student(arch, ws.teacher, seed=0)
                res = distill(student, cache, batches, c.distill.recipe("proxy"), budget, seed=0, progress=False)
            finally:
                torch.set_num_threads(threads)
            if rep:
                speeds[name].append(res.tokens_per_s)
    student = build_student(arch, ws.teacher, seed=0)
    embeddings = sum(p.numel() for n, p in student.named_parameters() if "embeddings" in n)
    flops_per_token = 6 * (count_parameters(student) - embeddings)
    n = 256 if args.smoke else 1024
    peaks = {"fp32": matmul_peak(torch.float32, n), "bf16": matmul_peak(torch.bfloat16, n)}
    base = statistics.median(next(iter(speeds.values())))
    rows = []
    for name, values in speeds.items():
        tps = statistics.median(values)
        rows.append({"variant": name, "tokens_per_s": tps, "ratio": tps / base,
                     "pct_peak": 100 * tps * flops_per_token / 1e9 / peaks["fp32"]})
    return rows, peaks


def variants_table(rows: list[dict]) -> str:
    lines = ["| cached step | tokens/s | vs configured | % of fp32 matmul peak |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['ratio']:.2f}x | {r['pct_peak']:.1f} |" for r in rows]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| teacher | teacher params (M) | live ms/step | cached ms/step | speed-up (live/cached) "
        "| cache build s | cache MB | break-even steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['teacher']} | {r['params_m']:.1f} | {r['live_ms']:.0f} | {r['cached_ms']:.0f} "
            f"| {r['speedup']:.2f}x | {r['build_s']:.1f} | {r['cache_mb']:.1f} | {r['break_even']} |"
        )
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    hit = next((r for r in rows if r["teacher"] == TARGET_TEACHER), None)
    if hit is None:
        return f"Target ({TARGET_TEACHER} cached >= {TARGET_SPEEDUP:g}x cheaper per step): not measured."
    met = "MET" if hit["speedup"] >= TARGET_SPEEDUP else "NOT MET"
    return f"Target ({TARGET_TEACHER} cached >= {TARGET_SPEEDUP:g}x cheaper per step): {met} ({hit['speedup']:.2f}x)."


# --smoke: one tiny random teacher, a tiny student, 2 steps x 1 repeat on 32 texts.
SMOKE = {"teachers": ["tiny"], "texts": 32, "steps": 2, "repeats": 1, "arch": "L1-H32-A2-F64-gelu"}


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=None, help="default minilm-l6 mpnet-base")
    p.add_argument("--texts", type=int, default=None, help="proxy texts (data.proxy_size; default 256)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps per measured run (default 12)")
    p.add_argument("--repeats", type=int, default=None, help="live/cached run pairs per teacher (default 3)")
    p.add_argument("--arch", default=None, help="default L4-H384-A6-F1536-gelu")
    add_common_args(p, RUNS_BENCH, "a tiny random teacher")
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else {"teachers": ["minilm-l6", "mpnet-base"], "texts": 256, "steps": 12,
                                         "repeats": 3, "arch": "L4-H384-A6-F1536-gelu"}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = out_folder(args.out, args.smoke, RUNS_BENCH)
    args.configs = {}

    start = time.perf_counter()
    rows = [bench_teacher(name, args) for name in args.teachers]
    lines = [*header("Distillation step: cached teacher states vs a live teacher", __file__, argv, args.configs), "",
             f"distill step: arch {args.arch}, {args.texts} proxy texts, "
             f"{args.steps} steps x {args.repeats} repeats (median)"]
    report = "\n".join(lines) + f"\n\n{table(rows)}\n\n{verdict(rows)}\n"
    for r in rows:
        p = r["peaks"]
        report += (f"\n### Where a cached step's time goes: {r['teacher']} teacher, {args.arch}\n\n"
                   f"matmul peak measured in this run ({256 if args.smoke else 1024}^3, every core): fp32 {p['fp32']:.0f} GFLOP/s, bf16 "
                   f"{p['bf16']:.0f} GFLOP/s ({p['bf16'] / p['fp32']:.2f}x fp32; well above 1x only where the CPU "
                   f"multiplies bf16 natively)\n\n{variants_table(r['variants'])}\n")
    out = publish(report, args.out / "distill_step.md")
    print(f"wrote {out}; total {time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
