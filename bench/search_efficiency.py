"""Benchmark: KD-NAS's LSTM controller vs random search vs regularised evolution.

Same number of evaluated candidates for every controller, several seeds:
(a) the synthetic landscape (known optimum, no training: seconds);
(b) with --real, a real small search on the embedded default (proxy distillation + measured
    latency). Evaluations are deterministic per architecture, so they are shared between
    controllers and seeds through an arch_id cache: each architecture is distilled once.

Reports the best reward found (mean and spread over seeds) and the number of evaluations each
controller needed to reach 95 % of the best reward known for the problem.

Run:  python -m bench.search_efficiency [--seeds 10] [--episodes 6] [--k 4] [--real]
      python -m bench.search_efficiency --smoke [--real]   # 2 seeds x 2 x 2; --real on a tiny random teacher
Writes runs/bench/search_efficiency.md.
"""

from __future__ import annotations

from bench.common import RUNS_BENCH, ROOT, OncePerArch, add_common_args, argv_of, header, out_folder, publish, smoke_config

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from kdnas_core.config import (  # noqa: E402
    ControllerConfig,
    SearchConfig,
    SearchSpaceConfig,
    config_from_dict,
    load_config,
)
from kdnas_core.search.controller import make_controller  # noqa: E402
from kdnas_core.search.reward import reward  # noqa: E402
from kdnas_core.search.loop import run_search  # noqa: E402
from kdnas_core.search.space import SearchSpace  # noqa: E402
from kdnas_core.search.synthetic import additive_landscape  # noqa: E402

KINDS = ("lstm", "random", "evolution")


def compare(space, evaluate, reward_fn, ctrl_cfg, search_cfg, seeds) -> dict[str, list[list[float]]]:
    """Reward sequences (in evaluation order) per controller kind and seed."""
    runs: dict[str, list[list[float]]] = {}
    for kind in KINDS:
        for seed in seeds:
            ctrl = make_controller(space, ctrl_cfg.model_copy(update={"kind": kind}), seed)
            res = run_search(ctrl, evaluate, reward_fn, search_cfg, seed=seed)
            runs.setdefault(kind, []).append([o.reward for o in res.observations])
    return runs


def table(title: str, runs: dict[str, list[list[float]]], best_known: float) -> str:
    target = 0.95 * best_known
    lines = [f"### {title}", "", f"best known reward {best_known:.4f}; target 95 % = {target:.4f}", "",
             "| controller | best reward (mean) | min..max over seeds | evaluations to 95 % (mean) | seeds reaching it |",
             "|---|---:|---:|---:|---:|"]
    for kind, seqs in runs.items():
        bests = [max(s) for s in seqs]
        hits = [next((i for i, r in enumerate(s, 1) if r >= target), None) for s in seqs]
        reached = [h for h in hits if h is not None]
        n = len(seqs[0])
        # A seed that never reaches the target counts as needing one more than the budget.
        mean_evals = statistics.mean(h if h is not None else n + 1 for h in hits)
        lines.append(f"| {kind} | {statistics.mean(bests):.4f} | {min(bests):.4f}..{max(bests):.4f} "
                     f"| {mean_evals:.1f} | {len(reached)}/{len(seqs)} |")
    return "\n".join(lines)


def synthetic(args) -> str:
    space = SearchSpace(SearchSpaceConfig())
    evaluate = additive_landscape(space, seed=0)
    reward_fn = lambda loss, lat: reward(loss, lat, 300.0)  # noqa: E731
    best = max(reward_fn(e.kd_loss, e.latency_ms) for e in map(evaluate, space))
    runs = compare(space, evaluate, reward_fn, ControllerConfig(epsilon_decay=0.25, train_epochs=300),
                   SearchConfig(episodes=args.episodes, candidates_per_episode=args.k), range(args.seeds))
    return table(f"(a) synthetic landscape: {len(space)} archs, {args.episodes} x {args.k} evaluations, "
                 f"{args.seeds} seeds", runs, best)


def real(args) -> str:
    from kdnas_core.search.candidates import ProxyEvaluator, teacher_latency
    from kdnas_core.search.runner import make_reward_fn
    from kdnas_core.workspace import Workspace
    from kdnas_core.search.reward import parse_budget
    from kdnas_core.search.loop import budgets_in_ms

    if args.smoke:
        cfg = config_from_dict(smoke_config(args.out / "work"), "smoke")
    else:
        cfg = load_config(ROOT / "configs/default.yaml")
    args.configs["(b)"] = cfg
    ws = Workspace.prepare(cfg)
    b, s = cfg.latency.reward_shape
    teacher_ms = teacher_latency(ws).median(cfg.latency.reward_backend, b, s)
    budgets = budgets_in_ms([parse_budget(x) for x in cfg.reward.budgets], teacher_ms)
    evaluate = OncePerArch(ProxyEvaluator(ws, progress=False))

    reward_fn = make_reward_fn(cfg, teacher_ms, budgets)
    seeds = range(args.real_seeds)
    runs = compare(ws.space, evaluate, reward_fn, cfg.controller.model_copy(update={"epsilon_decay": 0.25}),
                   SearchConfig(episodes=args.real_episodes, candidates_per_episode=args.k), seeds)
    best = max(reward_fn(e.kd_loss, e.latency_ms) for e in evaluate.results.values())
    where = "a tiny random teacher" if args.smoke else "embedded default"
    return table(f"(b) real search, {where} ({cfg.teacher.name}, {len(ws.space)} archs), "
                 f"{args.real_episodes} x {args.k} evaluations, {args.real_seeds} seeds, "
                 f"{len(evaluate.results)} distinct archs distilled", runs, best)


# name: (default, --smoke default)
SIZES = {"seeds": (10, 2), "episodes": (6, 2), "k": (4, 2), "real_seeds": (2, 1), "real_episodes": (3, 1)}


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None, help="default 10")
    p.add_argument("--episodes", type=int, default=None, help="default 6")
    p.add_argument("--k", type=int, default=None, help="default 4")
    p.add_argument("--real", action="store_true", help="also run (b), a real search (tens of minutes)")
    p.add_argument("--real-seeds", type=int, default=None, help="default 2")
    p.add_argument("--real-episodes", type=int, default=None, help="default 3")
    add_common_args(p, RUNS_BENCH, "--real on a tiny random teacher")
    args = p.parse_args(argv)
    for k, (full, smoke) in SIZES.items():
        if getattr(args, k) is None:
            setattr(args, k, smoke if args.smoke else full)
    args.out = out_folder(args.out, args.smoke, RUNS_BENCH)
    args.configs = {}
    start = time.perf_counter()
    parts = [synthetic(args)]
    if args.real:
        parts += ["", real(args)]
    parts += ["", f"total {time.perf_counter() - start:.0f} s"]
    report = "\n".join([*header("Search efficiency", __file__, argv, args.configs or None), "", *parts]) + "\n"
    return publish(report, args.out / "search_efficiency.md")


if __name__ == "__main__":
    main()
