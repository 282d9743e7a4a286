"""Benchmark: measured CPU latency across the search space, the latency predictor's accuracy,
and the speed-up over the teacher.

Measures ~30 architectures sampled from the default search space plus the teacher (ONNX
Runtime, fp32 and dynamic int8, batch 1 x 128 tokens, one thread), fits the latency predictor on
20 of them and reports its Spearman rank correlation and median absolute percentage error on the
other 10 (targets: >= 0.95 and <= 10 %), next to a params-only baseline. Speed-ups are ratios
measured in the same run, which is what stays meaningful on a noisy machine.

Run:  python -m bench.latency [--config configs/benchmark.yaml] [--archs 30] [--fit 20]
      python -m bench.latency --smoke      # a tiny random teacher, 6 archs, 3 runs each: seconds
Writes runs/bench/latency.md (and the fitted predictor, latency_predictor.json, beside it).
"""

from __future__ import annotations

from bench.common import RUNS_BENCH, ROOT, add_common_args, argv_of, header, out_folder, publish, smoke_config

import argparse  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from tqdm import tqdm  # noqa: E402

from kdnas_core.config import apply_overrides, config_from_dict, load_config  # noqa: E402
from kdnas_core.search.candidates import profile_arch, teacher_latency  # noqa: E402
from kdnas_core.latency import LatencyPredictor, params_baseline, predictor_error  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/benchmark.yaml"))
    p.add_argument("--archs", type=int, default=None, help="default 30 (--smoke: 6)")
    p.add_argument("--fit", type=int, default=None, help="default 20 (--smoke: 4)")
    p.add_argument("--runs", type=int, default=None, help="default 20 (--smoke: 3)")
    p.add_argument("--seed", type=int, default=0)
    add_common_args(p, RUNS_BENCH, "a tiny random teacher")
    args = p.parse_args(argv)
    for k, full, smoke in (("archs", 30, 6), ("fit", 20, 4), ("runs", 20, 3)):
        if getattr(args, k) is None:
            setattr(args, k, smoke if args.smoke else full)
    args.out = out_folder(args.out, args.smoke, RUNS_BENCH)

    overrides = {"latency.backends": ["ort-fp32", "ort-int8"], "latency.runs": args.runs}
    if args.smoke:
        cfg = config_from_dict(apply_overrides(smoke_config(args.out / "work"), overrides), "smoke")
    else:
        cfg = load_config(args.config, overrides)
    start = time.perf_counter()
    ws = Workspace.prepare(cfg)
    b, s = cfg.latency.reward_shape
    shape = f"{b}x{s}"
    teacher = teacher_latency(ws)
    t32, t8 = teacher.median("ort-fp32", b, s), teacher.median("ort-int8", b, s)

    rng = random.Random(args.seed)
    archs: list = []
    while len(archs) < args.archs:  # distinct archs, in a seeded order
        a = ws.space.sample(rng)
        if a not in archs:
            archs.append(a)
    rows = []
    for arch in tqdm(archs, desc="profiling"):
        rep = profile_arch(ws, arch, cache=False)  # fresh measurements, side by side
        f32, i8 = rep.results["ort-fp32"][shape], rep.results["ort-int8"][shape]
        rows.append((arch, f32.median_ms, i8.median_ms, f32.noisy or i8.noisy))

    fit, held = rows[: args.fit], rows[args.fit:]
    pred = LatencyPredictor.fit([r[0] for r in fit], [r[1] for r in fit], b, s, "ort-fp32", teacher.hardware)
    base = params_baseline([r[0] for r in fit], [r[1] for r in fit], ws.teacher.config.vocab_size,
                           ws.teacher.config.max_position_embeddings)
    truth = [r[1] for r in held]
    ours = predictor_error(pred.predict_many([r[0] for r in held]), truth)
    naive = predictor_error([base(r[0]) for r in held], truth)
    pred.save(args.out / "latency_predictor.json")

    lines = [
        *header("Latency across the search space and the latency predictor", __file__, argv, cfg), "",
        f"latency: teacher {cfg.teacher.name}, ORT CPU {shape}, {cfg.latency.intra_op_threads} thread(s), "
        f"median of {args.runs} runs; hardware: {teacher.hardware}",
        "",
        f"teacher: fp32 {t32:.1f} ms, int8 {t8:.1f} ms",
        "",
        "| arch | arch_id | fp32 ms | int8 ms | speed-up fp32 | speed-up int8 (vs teacher fp32) | predicted ms | set |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for i, (arch, f32, i8, noisy) in enumerate(sorted(rows, key=lambda r: r[1])):
        where = "fit" if any(arch == r[0] for r in fit) else "held-out"
        lines.append(
            f"| {arch.name} | {arch.arch_id} | {f32:.1f}{' (noisy)' if noisy else ''} | {i8:.1f} | "
            f"{t32 / f32:.1f}x | {t32 / i8:.1f}x | {pred.predict(arch):.1f} | {where} |"
        )
    lines += [
        "",
        f"predictor on {len(held)} held-out archs: Spearman {ours['spearman']:.3f} (target >= 0.95), "
        f"median abs. error {100 * ours['mdape']:.1f} % (target <= 10 %)",
        f"params-only baseline: Spearman {naive['spearman']:.3f}, median abs. error {100 * naive['mdape']:.1f} %",
        f"total {time.perf_counter() - start:.0f} s",
    ]
    report = "\n".join(lines) + "\n"
    return publish(report, args.out / "latency.md")


if __name__ == "__main__":
    main()
