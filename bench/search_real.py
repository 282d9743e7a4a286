"""KD-NAS against random search and regularised evolution at real scale, every pick final-distilled.

    python -m bench.search_real --config configs/benchmark.yaml --budgets 0.1x --mix      # mpnet-base
    python -m bench.search_real --config configs/multilingual.yaml --budgets 0.2x         # me5-small
    python -m bench.search_real --smoke       # a tiny random teacher: correctness only

Each controller runs the config's search (episodes x candidates: the same number of proxy
distillations for all) once per seed: ``lstm`` is KD-NAS, ``random`` and ``evolution`` the
baselines, ``lstm+screen`` KD-NAS with the zero-cost screen (``--screen`` candidates an episode,
``search.screen_signal``). A candidate any search visits is proxy-distilled once (the result is
deterministic per architecture). Every controller's pick per budget is then final-distilled with
the same recipe (cut from the teacher, one shared teacher-state cache, as bench.headline) and
scored on the config's evaluation tasks against its untrained floor; so are the hand-picks sized
to each budget (MiniLM shape, truncated and layer-dropped teacher, teacher depth but narrow) and
any named with ``--hand-picks`` (cut from the teacher as the config cuts its students, e.g. the
multilingual L6-H256-A8-F1536-gelu).

Writes ``search-real-<teacher>[-<budget>...].md`` (the budgets when ``--budgets`` names them; mean ± SE over seeds per controller and budget, the
hand-picks within ±25 % of the budget beside them, where KD-NAS loses) and updates
``search-real.csv`` (one row per pick: teacher, budget, controller, seed, arch, latency_ms,
summary, summary_se, dropin; this teacher's rows of these budgets replaced). Work goes to
runs/search-real-<config>/, so a rerun resumes searches, proxy runs and students: the run can be
spread over sessions on one machine.
"""

from __future__ import annotations

from bench.common import GENERAL_MIX, RESULTS, ROOT, OncePerArch, add_common_args, argv_of, header, out_folder, \
    publish, smoke_config

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.within_budget import correlations, proxy_distilled  # noqa: E402
from bench.headline import (  # noqa: E402
    Row,
    distil_rows,
    evaluate_rows,
    hand_picked,
    inherited_row,
    table,
    time_rows,
    with_floor,
)
from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.latency import count_params  # noqa: E402
from kdnas_core.search.candidates import ProxyEvaluator, teacher_latency  # noqa: E402
from kdnas_core.search.loop import budgets_in_ms  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.reward import parse_budget  # noqa: E402
from kdnas_core.search.runner import search_in_folder  # noqa: E402
from kdnas_core.search.signals import SIGNALS, zero_cost_screen  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.student import untrained_floor  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402

CONTROLLERS = ("lstm", "random", "evolution", "lstm+screen")
BAND = 0.25  # hand-picks within ±25 % of the budget's latency stand beside the picks


def make_config(args, work: Path):
    import yaml

    base = smoke_config(work) if args.smoke else yaml.safe_load((ROOT / args.config).read_text())
    overrides = {"paths.output_dir": str(work), "distill.final.epochs": args.final_epochs, "tracking.enabled": False}
    if args.train_texts:
        overrides["data.train_size"] = args.train_texts
    if args.budgets:
        overrides["reward.budgets"] = args.budgets
    if args.mix and not args.smoke:
        overrides |= {"data.source": "mix", "data.path": None, "data.mix": GENERAL_MIX}
    return config_from_dict(apply_overrides(base, overrides), "smoke" if args.smoke else args.config)


def controller_config(cfg, controller: str, seed: int, screen: int):
    """The config one search runs: its controller, its seed, and the screen for ``lstm+screen``
    only (off for the others whatever the config says: they are the unscreened baselines)."""
    kind, _, extra = controller.partition("+")
    return cfg.model_copy(update={"controller": cfg.controller.model_copy(update={"kind": kind}), "seed": seed,
                                  "search": cfg.search.model_copy(update={"screen": screen if extra == "screen" else 0})})


def run_searches(ws: Workspace, teacher_ms: float, controllers: list[str], seeds: list[int], screen: int):
    """Every (controller, seed) search on one shared proxy cache. Returns one dict per pick, the
    quality signals of every architecture the searches proxy-distilled (arch name -> signals,
    read from their observations, so a resumed run has them too) and the proxy evaluator."""
    proxy = ProxyEvaluator(ws)
    evaluate = OncePerArch(proxy)
    scorer = zero_cost_screen(lambda: proxy.probe, ws.cfg.search.screen_signal, progress=True)
    picks, distilled = [], {}
    for controller in controllers:
        for seed in seeds:
            cfg = controller_config(ws.cfg, controller, seed, screen)
            print(f"--- search: {controller}, seed {seed}", flush=True)
            t0 = time.perf_counter()
            res = search_in_folder(cfg, ws.space, teacher_ms, evaluate=evaluate,
                                   screen=scorer if cfg.search.screen else None)
            for o in res.observations:  # a resumed search ran none of them here
                if not o.failed:
                    distilled.setdefault(o.arch.name, o.extra.get("signals") or {})
            for rec in res.recommendations:
                picks.append({"controller": controller, "seed": seed, "budget": rec.budget, "arch": rec.arch,
                              "search_latency_ms": rec.latency_ms, "search_s": time.perf_counter() - t0})
    return picks, distilled, proxy


def mean_se(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")


def summarise(df: pd.DataFrame, hands: pd.DataFrame, budgets: dict[str, float]) -> tuple[pd.DataFrame, list[str]]:
    """Mean ± SE over seeds per budget and controller, and the checks per budget: KD-NAS's mean
    beats random search's by one SE, and is at least the best hand-pick within ±25 % of the
    budget and the best within the budget itself. A user's budget is a ceiling (the searches
    recommend nothing over it), so a hand-pick up to 25 % over it is a student that user cannot
    ship: both comparisons are written."""
    rows, lines = [], []
    for budget, ms in budgets.items():
        here = df[df.budget == budget]
        stats = {}
        for controller, g in here.groupby("controller", sort=False):
            m, se = mean_se(g.summary)
            d, _ = mean_se(g.dropin)
            stats[controller] = (m, se)
            rows.append({"budget": budget, "controller": controller, "seeds": len(g), "found": int(g.arch.notna().sum()),
                         "summary": m, "summary_se_over_seeds": se, "dropin": d,
                         "latency_over_budget": float((g.latency_ms / ms).mean()),
                         "archs": ", ".join(sorted(set(g.arch.dropna())))})
        near = hands[((hands.latency_ms - ms).abs() <= BAND * ms) & pd.to_numeric(hands.summary).notna()]
        best_hand = near.loc[near.summary.idxmax()] if len(near) else None
        under = near[near.latency_ms <= ms]
        best_under = under.loc[under.summary.idxmax()] if len(under) else None
        for controller in (c for c in stats if c.startswith("lstm")):
            m, se = stats[controller]
            if "random" in stats:
                r, rse = stats["random"]
                lines.append(f"- {budget}, {controller} vs random: {m:.3f} ± {se:.3f} vs {r:.3f} ± {rse:.3f} "
                             f"({m - r:+.3f}); beats it by at least one SE: "
                             f"{'met' if m - r >= np.nanmax([se, rse, 0.0]) else 'missed'}")
            if best_hand is not None:
                lines.append(f"- {budget}, {controller} vs the best hand-pick within ±{BAND:.0%} ({best_hand.model}, "
                             f"{best_hand.summary:.3f} ± {best_hand.summary_se:.3f}): "
                             f"{'met' if m >= best_hand.summary else 'missed'} ({m - best_hand.summary:+.3f})")
            else:
                lines.append(f"- {budget}: no hand-pick measured within ±{BAND:.0%} of the budget")
            if best_under is not None:
                lines.append(f"- {budget}, {controller} vs the best hand-pick within the budget (at most {ms:.2f} ms: "
                             f"{best_under.model}, {best_under.latency_ms:.2f} ms, "
                             f"{best_under.summary:.3f} ± {best_under.summary_se:.3f}): "
                             f"{'met' if m >= best_under.summary else 'missed'} ({m - best_under.summary:+.3f})")
            elif best_hand is not None:
                lines.append(f"- {budget}: every hand-pick within ±{BAND:.0%} runs over the budget ({ms:.2f} ms)")
    return pd.DataFrame(rows), lines


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/benchmark.yaml")
    ap.add_argument("--budgets", nargs="+", default=None, help="latency budgets (default the config's)")
    ap.add_argument("--controllers", nargs="+", default=None, choices=CONTROLLERS,
                    help="default lstm random evolution (--smoke: lstm random lstm+screen)")
    ap.add_argument("--seeds", type=int, default=None, help="searches per controller (default 3; --smoke 2)")
    ap.add_argument("--screen", type=int, default=200, help="candidates screened an episode by lstm+screen")
    ap.add_argument("--train-texts", type=int, default=None, help="final distillation texts (default the config's)")
    ap.add_argument("--final-epochs", type=int, default=2)
    ap.add_argument("--mix", action="store_true", help="final students distilled on the general English mix")
    ap.add_argument("--hand-picks", nargs="+", default=[], metavar="ARCH",
                    help="more hand-picked students, e.g. L6-H256-A8-F1536-gelu, cut from the teacher")
    add_common_args(ap, RESULTS, "a tiny random teacher")
    args = ap.parse_args(argv)
    # parsed now: a misspelt name fails before hours of searching, not after
    extra_hands = [StudentArch.from_name(name) for name in args.hand_picks]
    args.controllers = args.controllers or (["lstm", "random", "lstm+screen"] if args.smoke else
                                            ["lstm", "random", "evolution"])
    seeds = list(range(args.seeds or (2 if args.smoke else 3)))
    if args.smoke:
        args.screen = min(args.screen, 8)
        args.train_texts = args.train_texts or 64
    out = out_folder(args.out, args.smoke, RESULTS)
    work = out / "work" if args.smoke else ROOT / "runs" / f"search-real-{Path(args.config).stem}"
    cfg = make_config(args, work)
    teacher_label = "smoke" if args.smoke else cfg.teacher.name
    ws = Workspace.prepare(cfg).validate()
    b, s = cfg.latency.reward_shape
    teacher_ms = teacher_latency(ws).median(cfg.latency.reward_backend, b, s)
    budgets = dict(budgets_in_ms([parse_budget(x) for x in cfg.reward.budgets], teacher_ms))
    t0 = time.perf_counter()
    picks, distilled, proxy = run_searches(ws, teacher_ms, args.controllers, seeds, args.screen)
    n_distinct = len(distilled)
    search_s = time.perf_counter() - t0

    # One row per distinct student: a pick shared by two searches is distilled and scored once.
    t0 = time.perf_counter()
    rows: dict[str, Row] = {}
    for p in picks:
        if p["arch"] and p["arch"] not in rows:
            a = StudentArch.from_name(p["arch"])
            rows[p["arch"]] = inherited_row(ws, a, f"pick {a.name}", "pick")
    hands: dict[str, Row] = {}
    for ms in budgets.values():
        for r in hand_picked(ws, ms, cfg.seed):
            hands.setdefault(r.name, r)
    for a in extra_hands:
        name = f"hand-picked {a.name}"
        if name not in hands:  # a name given twice is cut and distilled once
            hands[name] = inherited_row(ws, a, name, "hand-picked")
    for r in hands.values():
        if r.floor is None:
            with_floor(r, untrained_floor(r.model.config, cfg.seed))
    students = [*rows.values(), *hands.values()]
    teacher = Row(f"teacher {cfg.teacher.name}", "teacher", "", ws.teacher.model)
    time_rows([teacher, *students], cfg)
    distil_rows(ws, students, work)
    evaluate_rows(ws, [teacher] + [x for r in students for x in (r, r.floor)], None, work)
    scored = table([teacher] + [x for r in students for x in (r, r.floor)], teacher, cfg).set_index("model")
    final_s = time.perf_counter() - t0
    shape = f"{b}x{s}"

    def score(row: Row) -> dict:
        d = scored.loc[row.name]
        return {"latency_ms": round(row.latency["ort-fp32"][shape], 2), "summary": d.get("summary"),
                "summary_se": d.get("summary_se"), "dropin": d.get("dropin")}

    out_rows = [{"teacher": cfg.teacher.name, "budget": p["budget"], "controller": p["controller"], "seed": p["seed"],
                 "arch": p["arch"], **(score(rows[p["arch"]]) if p["arch"] else {})} for p in picks]
    df = pd.DataFrame(out_rows, columns=["teacher", "budget", "controller", "seed", "arch", "latency_ms", "summary",
                                         "summary_se", "dropin"])
    hand_df = pd.DataFrame([{"model": r.name, "arch": r.arch, **score(r)} for r in hands.values()])
    summary, checks = summarise(df, hand_df, budgets)
    signal_df = signals_beside_summaries(ws, proxy, students, distilled, score, work)
    signal_corr = correlations(signal_df) if len(signal_df) >= 3 else pd.DataFrame()

    combined = out / "search-real.csv"
    if combined.is_file() and not args.smoke:
        earlier = pd.read_csv(combined)
        # this run's teacher and budgets replace their earlier rows; other budgets' rows stay
        same = (earlier.teacher == cfg.teacher.name) & earlier.budget.isin(list(budgets))
        df_all = pd.concat([earlier[~same], df], ignore_index=True)
    else:
        df_all = df
    df_all.to_csv(combined, index=False)
    report = out / f"search-real-{teacher_label}{''.join('-' + b for b in args.budgets or [])}.md"
    md = [*header(f"Search at real scale: {', '.join(args.controllers)} on {cfg.teacher.name}", __file__, argv, cfg), "",
          f"- budgets {', '.join(f'{k} = {v:.2f} ms' for k, v in budgets.items())} (teacher {teacher_ms:.2f} ms, "
          f"{cfg.latency.reward_backend} {b}x{s})",
          f"- each search {cfg.search.episodes} episodes x {cfg.search.candidates_per_episode} proxy distillations on "
          f"{len(ws.splits.proxy)} proxy texts, seeds {', '.join(map(str, seeds))}; {n_distinct} distinct "
          f"architectures proxy-distilled over all searches"
          + (f"; lstm+screen screens {args.screen} candidates an episode by {cfg.search.screen_signal}"
             if "lstm+screen" in args.controllers else ""),
          f"- every pick and hand-pick final-distilled on {len(ws.splits.train)} {cfg.data.source} texts x "
          f"{cfg.distill.final.epochs} epochs (cut from the teacher; MiniLM-shape and narrow hand-picks random init), "
          "scored on the config's tasks against its untrained floor; summary ± SE over seeds",
          f"- time: searches {search_s / 60:.1f} min, final students and scoring {final_s / 60:.1f} min "
          "(a resumed run counts only what it redid)",
          "", "## Per budget and controller", "", markdown_table(summary.round(3)), "",
          "## Against random search and the hand-picks", "", *checks, "",
          "## Every pick", "", markdown_table(df.round(3)), "",
          f"## Hand-picks (sized to each budget; ±{BAND:.0%} of it counts as within)", "",
          markdown_table(hand_df.round(3)), ""]
    if len(signal_corr):
        md += ["## Which signal orders these students", "",
               f"Every student above cut from the teacher as the search cuts its candidates ({len(signal_df)}): its "
               "quality signals on the search's held-out texts, zero-cost (zc_, as cut) and after the search's proxy "
               "distillation (proxy_), beside its final summary. tau: Kendall, signed so that + = ranks like the "
               "summary; 95 % interval: bootstrap over the students. The search screens by "
               f"zc_{cfg.search.screen_signal} and recommends by the proxy's reward.quality ({cfg.reward.quality}"
               + (": its KD loss)." if cfg.reward.quality == "hidden" else ")."),
               "", markdown_table(signal_corr), "", markdown_table(signal_df.round(4)), ""]
    return publish("\n".join(md), report)


def signals_beside_summaries(ws: Workspace, proxy: ProxyEvaluator, students: list[Row], distilled: dict[str, dict],
                             score, work: Path) -> pd.DataFrame:
    """Zero-cost and proxy signals of every final student the search could itself have produced
    (in its space, cut from the teacher as the config cuts), beside its final summary: which signal would have
    ranked the picks and hand-picks as they scored. Proxy signals come from the searches where
    they distilled the architecture, else from a proxy run kept under ``work``/proxy."""
    t, rows = ws.teacher.config, {}
    for r in students:
        # random-init hand-picks are not candidates, nor a teacher cut another way than the
        # config cuts (the truncated teacher's first layers where the search spreads them)
        if r.cut != ws.cfg.student.layers or r.arch in rows:
            continue
        arch = StudentArch.from_name(r.arch)
        if arch not in ws.space:  # e.g. the teacher's full FFN where the space stops below it
            continue
        zc = proxy.probe.zero_cost(arch).to_dict()
        signals = distilled.get(arch.name) or proxy_distilled(proxy, arch, work / "proxy").signals
        scores = score(r)
        rows[r.arch] = {"arch": r.arch, "summary": scores["summary"], "latency_ms": scores["latency_ms"],
                        "params_m": round(count_params(arch, t.vocab_size, t.max_position_embeddings)["encoder"] / 1e6, 2),
                        **{f"zc_{k}": zc.get(k) for k in SIGNALS}, **{f"proxy_{k}": signals.get(k) for k in SIGNALS}}
    df = pd.DataFrame(list(rows.values()))
    return df.sort_values("summary", ascending=False).reset_index(drop=True) if len(df) else df


if __name__ == "__main__":
    main()
