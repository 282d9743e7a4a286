"""Does a weight-shared super-network of the teacher order students within a budget better than
the zero-cost screen or the proxy run?

    python -m bench.supernet --config configs/benchmark.yaml --mix     # mpnet-base, 0.1x students
    python -m bench.supernet --config configs/multilingual.yaml        # me5-small, 0.2x students
    python -m bench.supernet --smoke      # a tiny random teacher: correctness only

The students and their final summaries are those of a committed within-budget table
(``--within``, default bench/results/within-budget-<teacher>.csv, made by ``python -m
bench.within_budget`` with the same config flags): ten students within ±25 % of one budget, each
proxy-distilled, final-distilled and scored. This trains the teacher as a super-network
(``kdnas_core.search.supernet``: ``--steps`` steps on the search's proxy texts, ``--per-step``
students drawn uniformly from the whole search space each step, none chosen for this budget),
then scores each of those students cut from it with the zero-cost screen's signals on the same
held-out texts, at ``--checkpoints`` points of the training. The report gives Kendall tau with
the final summary for these super-network signals beside the table's zero-cost and proxy ones,
and what each costs.

``--finals ARCH ...`` asks the other question, whether the super-network is a better start:
each named student is cut twice, from the teacher (as kdnas cuts students) and from the trained
super-network, and each cut is final-distilled with the config's final recipe on the same
``--train-texts`` and scored before and after, against one untrained floor per student.
"""

from __future__ import annotations

from bench.common import RESULTS, ROOT, add_common_args, argv_of, header, out_folder, publish

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from bench.within_budget import correlations, make_config  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.signals import SIGNALS  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.search.supernet import SuperNet  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/benchmark.yaml")
    ap.add_argument("--mix", action="store_true", help="as bench.within_budget --mix (English teachers)")
    ap.add_argument("--within", type=Path, default=None,
                    help="the within-budget table (default bench/results/within-budget-<teacher>.csv)")
    ap.add_argument("--steps", type=int, default=None, help="super-network training steps (default 300; --smoke 6)")
    ap.add_argument("--per-step", type=int, default=3, help="students drawn each step")
    ap.add_argument("--checkpoints", type=int, default=3, help="score the students this many times along the training")
    ap.add_argument("--train-texts", type=int, default=None, help="as bench.within_budget (default 4000)")
    ap.add_argument("--final-epochs", type=int, default=2, help="as bench.within_budget")
    ap.add_argument("--finals", nargs="*", default=[],
                    help="students to final-distil from both starts, the teacher's cut and the super-network's")
    add_common_args(ap, RESULTS, "a tiny random teacher, after bench.within_budget --smoke")
    args = ap.parse_args(argv)
    args.steps = args.steps or (6 if args.smoke else 300)
    args.train_texts = args.train_texts or (64 if args.smoke else 4000)
    out = out_folder(args.out, args.smoke, RESULTS)
    if args.smoke and args.within is None:  # its own within-budget table of the same tiny teacher
        from bench import within_budget

        within_budget.main(["--smoke", "--out", str(out)])
        args.within = out / "within-budget-smoke.csv"
    work = out / "work" if args.smoke else ROOT / "runs" / f"supernet-{Path(args.config).stem}"
    cfg = make_config(args, work)
    label = "smoke" if args.smoke else cfg.teacher.name
    within = args.within or RESULTS / f"within-budget-{label}.csv"
    if not within.is_file():
        raise SystemExit(f"--within {within}: no such within-budget table (python -m bench.within_budget first)")
    table = pd.read_csv(within)
    if not {"arch", "summary", "summary_se"} <= set(table.columns):
        raise SystemExit(f"--within {within}: expected columns arch, summary, summary_se")
    ws = Workspace.prepare(cfg).validate()
    net = SuperNet(ws)
    archs = [StudentArch.from_name(a) for a in table.arch]
    marks = sorted({round(args.steps * (i + 1) / args.checkpoints) for i in range(args.checkpoints)})
    curve, done = [], 0
    for mark in [0, *marks]:
        if mark > done:
            net.train(mark - done, args.per_step, seed=cfg.seed + done)
            done = mark
        t0 = time.perf_counter()
        rows = {a.name: {f"super_{k}": v for k, v in net.signals(a).to_dict().items() if k in SIGNALS} for a in archs}
        score_s = (time.perf_counter() - t0) / len(archs)
        scored = table.assign(**{c: [rows[a][c] for a in table.arch] for c in rows[archs[0].name]})
        tau = correlations(scored, moments=("super",)).set_index("signal").kendall_tau
        curve.append({"step": mark, **{s: tau.get(f"super_{s}") for s in SIGNALS if f"super_{s}" in tau}})
        print(f"step {mark}: {curve[-1]}", flush=True)
    df = scored  # the last checkpoint's signals: the trained super-network's
    corr = correlations(df, moments=("zc", "proxy", "super"))
    stem = out / f"supernet-{label}"
    df.to_csv(stem.with_suffix(".csv"), index=False)
    run = net.run.to_dict()
    proxy_s = table.proxy_seconds.mean() if "proxy_seconds" in table else float("nan")
    finals = final_rows(ws, net, [StudentArch.from_name(a) for a in args.finals], work / "finals" / f"{args.steps}-steps")
    md = [*header(f"A weight-shared super-network as the within-budget signal: {cfg.teacher.name}", __file__, argv, cfg),
          "",
          f"- students: the {len(df)} of `{within.relative_to(ROOT) if within.is_relative_to(ROOT) else within}` "
          "(within ±25 % of one budget, final summaries from that run)",
          f"- super-network: the teacher's transformer weights trained {run['steps']} steps on the search's "
          f"{len(ws.splits.proxy)} proxy texts (batches cycled), {args.per_step} students drawn uniformly from the "
          f"search space each step ({run['distinct_students']} distinct), the proxy recipe's KD loss with the "
          "projection heads fixed at each cut's selection; embeddings kept the teacher's",
          f"- cost: {run['seconds'] / 60:.1f} min of super-network training (mean step loss {run['loss_first']:.4f} at "
          f"the first step, {run['loss_last_10']:.4f} over the last 10); then {score_s:.1f} s per student scored, "
          f"against {proxy_s:.1f} s per proxy run in the within-budget table (another machine, perhaps)",
          f"- signals on the search's {len(net.probe.texts)} held-out texts ({len(net.probe.pairs)} translation "
          "pairs); super_ = cut from the trained super-network; zc_ and proxy_ as in the within-budget table",
          "- tau: Kendall, signed so that + = ranks like the final summary; 95 % interval: bootstrap over the students",
          "", "## Rank correlation with the final summary", "", markdown_table(corr), "",
          "## Along the super-network's training (tau of each super_ signal)", "",
          markdown_table(pd.DataFrame(curve)), "",
          *(["## Final distillation from each start", "",
             f"Each student cut from the teacher and from the super-network, final-distilled on {len(ws.splits.train)} "
             f"{cfg.data.source} texts x {cfg.distill.final.epochs} epochs with the final recipe (summary gap closed "
             "against the student's untrained floor, ± SE; *start* = the cut before any distillation):", "",
             markdown_table(finals), ""] if len(finals) else []),
          "## Students", "",
          markdown_table(df[["arch", "summary", "summary_se", "params_m",
                             *[c for c in df.columns if c.startswith(("zc_", "proxy_", "super_"))
                               and not c.endswith("seconds")]]]),
          ""]
    return publish("\n".join(md), stem.with_suffix(".md"))


def final_rows(ws: Workspace, net: SuperNet, archs: list[StudentArch], work: Path) -> pd.DataFrame:
    """Each of ``archs`` cut from the teacher and from ``net``, scored as cut and after the final
    distillation (folders under ``work`` by start and arch_id, so a rerun reuses them)."""
    import functools

    from bench.common import final_distilled
    from kdnas_core.evaluation.evaluate import compare, evaluate_model
    from kdnas_core.inherit import init_projections

    if not archs:
        return pd.DataFrame()
    cfg = ws.cfg
    layers = ws.layers_for(sorted({a.layers for a in archs}), "final")
    states, eval_states = ws.cached_states("train", layers), ws.eval_states(layers)
    batches = ws.distill_batches("train", states)
    e, max_len = cfg.evaluate, cfg.evaluate.max_length or cfg.data.max_length
    cache = cfg.paths.cache_path() / "embeddings"

    def summary(model, name, floor):
        ev = evaluate_model(model, ws.teacher.tokenizer, name, ws.tasks, ws.fidelity_texts, e, max_len, cache, cfg.seed)
        c = compare(ev, ws.teacher_eval, floor, e, cfg.seed)
        return c["summary"], c["summary_se"], c.get("dropin")

    rows = []
    for arch in archs:
        floor = evaluate_model(ws.untrained_student(arch, cfg.seed), ws.teacher.tokenizer, f"{arch.name} floor",
                               ws.tasks, ws.fidelity_texts, e, max_len, cache, cfg.seed)
        init = functools.partial(init_projections, selection=ws.selection(arch), teacher_hidden=ws.teacher.hidden)
        for start in ("teacher", "super-network"):
            print(f"--- {arch.name} from the {start}", flush=True)
            cut = ws.build_student(arch) if start == "teacher" else net.student(arch)
            s0, se0, d0 = summary(cut, f"{arch.name} cut from the {start}", floor)  # scoring leaves weights as they are
            model, result = final_distilled(ws, cut.train(), batches, states, eval_states, init,
                                            work / start / arch.arch_id)
            s1, se1, d1 = summary(model, f"{arch.name} from the {start}, distilled", floor)
            rows.append({"arch": arch.name, "start": start, "start_summary": s0, "start_se": se0, "start_dropin": d0,
                         "summary": s1, "summary_se": se1, "dropin": d1,
                         "best_step": result.get("best_step"), "final_eval_loss": result.get("final_eval_loss"),
                         "distill_min": round(result.get("seconds", 0) / 60, 1)})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
