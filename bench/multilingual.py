"""Multilingual students: the table (KD-NAS picks vs the layer-dropped teacher), one student under
each distillation recipe, and the search's proxy loss over seeds; one script, three sub-commands.

    python -m bench.multilingual table                 # configs/multilingual.yaml (me5-small)
    python -m bench.multilingual table --episodes 2 --train-texts 3000   # quicker
    python -m bench.multilingual recipe                # every recipe on L6-H256-A8-F1536-gelu
    python -m bench.multilingual recipe --arch L3-H384-A12-F1536-gelu --train-texts 4000
    python -m bench.multilingual proxy                 # the two 0.2x candidates over seeds 0 1 2
    python -m bench.multilingual proxy --archs L6-H256-A8-F1536-gelu L3-H384-A12-F512-gelu --seeds 0 1 2 3
    python -m bench.multilingual <sub-command> --smoke # a tiny random teacher, real messages: correctness only

``table``: a multilingual teacher, the KD-NAS pick per budget and a hand-picked layer-dropped
teacher at the pick's latency, each scored on translation retrieval per language pair and
direction, with speed-up, parameters and file size. Every student is distilled with the config's
recipe on its corpus (translation pairs of software messages), trimmed to the corpus's
vocabulary when the config says so, and scored by kdnas's own evaluation (gap closed against
each student's untrained floor, the summary over the tasks). Writes
bench/results/multilingual.{md,csv}; work files go to the config's output folder so a rerun resumes.

``recipe``: which distillation recipe keeps a multilingual student's languages? One
architecture, cut from the teacher, distilled with each recipe on the same corpus and scored on
translation retrieval per language pair, next to its inherited start (no distillation) and its
untrained floor. The architecture is fixed, so latency is not measured: the rows differ only in
how they were trained, and, for the vocabulary rows, in the tokens they kept. Recipes:

- ``hidden+pooled``: per-layer hidden-state MSE, weight 1, and pooled cosine;
- ``pooled x5``: the pooled-cosine weight raised to 5 (the default for English teachers);
- ``pooled only``: no hidden-state term, only the sentence embedding is matched, as
  multilingual sentence-embedding distillation does (Reimers & Gurevych 2020); a multilingual
  teacher already maps translations together, so matching its embedding of every corpus
  language should keep them together;
- each with ``student.vocab: teacher`` (all 250 k rows) unless the recipe says ``trimmed``
  (``student.vocab: corpus``: the corpus's pieces only) or ``trimmed + top N`` (the corpus's
  pieces and the teacher's N most likely ones, ``student.vocab_keep_top``);
- distilled on fortunes unless the recipe says ``messages`` (``data.source: messages``: software
  messages and their translations from the message catalogues that the gettext-<lang>
  evaluation sets do not read, in the fortunes' languages and French);
- ``translation targets`` (``data.translation_targets``): each translated message is distilled
  towards the teacher's embedding of its English original, not of itself (Reimers & Gurevych).

Writes bench/results/multilingual-recipe.{md,csv} (--name sets the file name); students go to
runs/multilingual-recipe/<recipe>/.

``proxy``: does the multilingual search's proxy rank two students the way their final
distillation does? Each architecture is proxy-distilled as the search does
(configs/multilingual.yaml: 1,000 messages x 2 epochs, held-out pooled cosine distance to the
translation targets) under several seeds (each seed draws its own splits and student start), so
a proxy gap can be read against seed noise. Writes bench/results/multilingual-proxy-seeds.{md,csv}.
"""

from __future__ import annotations

from bench.common import RESULTS, ROOT, add_common_args, argv_of, header, out_folder, tiny_teacher

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from kdnas_core.config import apply_overrides, config_from_dict  # noqa: E402
from kdnas_core.search.candidates import ProxyEvaluator, latency_profile  # noqa: E402
from kdnas_core.final import final_student  # noqa: E402
from kdnas_core.inherit import full_width  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.pipeline import search_without_prefect  # noqa: E402
from kdnas_core.evaluation.table import describe_tasks, evaluate_students  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402

# The fortunes' languages (zh_CN for zh) and French: every language the evaluation scores.
MESSAGE_LANGUAGES = ["de", "es", "it", "ru", "pl", "cs", "zh_CN", "fr"]
# Every recipe names its corpus, loss weights and vocabulary, so a row means the same whatever
# configs/multilingual.yaml says today (it moved from fortunes to messages with translation
# targets after these rows were measured).
FORTUNES = {"data.source": "fortunes", "data.languages": ["en", "de", "es", "it", "ru", "pl", "cs", "zh"],
            "data.translation_targets": False}
MESSAGES = {"data.source": "messages", "data.languages": MESSAGE_LANGUAGES, "data.translation_targets": False}
PAIRS = {**MESSAGES, "data.translation_targets": True}
HIDDEN = {"distill.weights.hidden_mse": 1.0, "distill.weights.pooled_cosine": 1.0}
POOLED = {"distill.weights.hidden_mse": 0.0, "distill.weights.pooled_cosine": 1.0}
FULL = {"student.vocab": "teacher"}


def trimmed(top: int = 0) -> dict:
    return {"student.vocab": "corpus", "student.vocab_keep_top": top}


# name -> config overrides; every recipe keeps the rest of the config's distillation settings.
RECIPES = {
    "hidden+pooled": {**FORTUNES, **HIDDEN, **FULL},
    "hidden+pooled, trimmed": {**FORTUNES, **HIDDEN, **trimmed()},
    "pooled x5": {**FORTUNES, **HIDDEN, **FULL, "distill.weights.pooled_cosine": 5.0},
    "pooled only": {**FORTUNES, **POOLED, **FULL},
    "pooled only, trimmed": {**FORTUNES, **POOLED, **trimmed()},
    "pooled only, trimmed + top 50k": {**FORTUNES, **POOLED, **trimmed(50_000)},
    "pooled only, trimmed + top 100k": {**FORTUNES, **POOLED, **trimmed(100_000)},
    "pooled only, messages": {**MESSAGES, **POOLED, **FULL},
    "hidden+pooled, messages": {**MESSAGES, **HIDDEN, **FULL},
    "pooled only, messages, trimmed + top 100k": {**MESSAGES, **POOLED, **trimmed(100_000)},
    "pooled only, messages, translation targets": {**PAIRS, **POOLED, **FULL},
    "pooled only, messages, translation targets, trimmed + top 100k": {**PAIRS, **POOLED, **trimmed(100_000)},
    "pooled only, messages, translation targets, trimmed + top 50k": {**PAIRS, **POOLED, **trimmed(50_000)},
}

# What --smoke runs per sub-command: students of a tiny random teacher, two recipes (one on
# fortunes, one on messages with translation targets), two seeds.
SMOKE_ARCH = "L2-H64-A4-F128-gelu"
SMOKE_RECIPES = ["pooled only, trimmed + top 50k", "pooled only, messages, translation targets"]
SMOKE_ARCHS = ["L1-H32-A2-F64-gelu", "L2-H64-A4-F128-gelu"]


def base_config(args) -> dict:
    """The config file as a dict; under --smoke the same recipe around a tiny random BERT teacher
    with real messages at tiny sizes, two of its translation tasks, caches and runs under
    <out>/work."""
    raw = yaml.safe_load((ROOT / args.config).read_text())
    if not args.smoke:
        return raw
    work = args.out / "work"
    return apply_overrides(raw, {
        "paths.cache_dir": str(work / "cache"), "paths.output_dir": str(work / "runs"),
        "teacher.name": str(tiny_teacher(work / "teacher")),
        "data.train_size": 64, "data.eval_size": 48, "data.proxy_size": 48, "data.batch_size": 16, "data.max_length": 24,
        # the teacher's own FFN width (256) too: the layer-dropped teacher is a full-width arch
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128, 256], "activation": ["gelu"],
                         "cap_to_teacher": True},
        "student.vocab_keep_top": 1000,
        "distill.proxy.epochs": 1, "distill.proxy.lr": 1e-3, "distill.final.epochs": 1, "distill.eval_batches": 2,
        "latency.grid": [[1, 16]], "latency.runs": 3, "latency.warmup": 1,
        "reward.budgets": ["0.9x", "1000ms"],
        "search.episodes": 1, "search.candidates_per_episode": 2,
        "evaluate.bootstrap": 100, "evaluate.fidelity_texts": 40,
        "evaluate.tasks": [{**t, "test_size": 100} for t in raw["evaluate"]["tasks"][:3]],
    })


# ---------------------------------------------------------------------------------------- table


def layer_dropped(ws: Workspace, target_ms: float) -> StudentArch:
    """The teacher's full width with the number of evenly spread layers whose latency is
    closest to ``target_ms`` (sentence-transformers' layer reduction)."""
    options = [full_width(ws.teacher.config, k) for k in ws.cfg.search_space.layers if k < ws.teacher.num_layers]
    return min(options, key=lambda a: abs(latency_profile(ws, a).latency_ms - target_ms))


def folder_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).glob("model.safetensors")) / 1e6


def table(args, argv: list[str]) -> Path:
    raw = base_config(args)
    overrides = {"tracking.enabled": False}
    for knob, field in (("episodes", "search.episodes"), ("candidates", "search.candidates_per_episode"),
                        ("train_texts", "data.train_size")):
        if getattr(args, knob) is not None:
            overrides[field] = getattr(args, knob)
    if args.test_size:
        overrides["evaluate.tasks"] = [{**t, "test_size": args.test_size} for t in raw["evaluate"]["tasks"]]
    cfg = config_from_dict(apply_overrides(raw, overrides), args.config)
    ws = Workspace.prepare(cfg)
    result, out, teacher_ms = search_without_prefect(cfg, ws=ws)
    picks = [r for r in result.recommendations if r.arch]
    if not picks:
        raise SystemExit(f"KD-NAS found no student within any budget: {result.recommendations}")
    archs = {r.arch: f"KD-NAS pick, budget {r.budget}" for r in picks}
    hand = layer_dropped(ws, picks[0].latency_ms)
    dropped = f"layer-dropped teacher ({hand.layers} evenly spread layers)"
    # A pick can be the layer-dropped teacher itself: one row then, named for both.
    archs[hand.name] = f"{archs[hand.name]} = {dropped}" if hand.name in archs else dropped
    finals = {name: final_student(cfg, ws, StudentArch.from_name(name)) for name in archs}
    table = evaluate_students(ws, [f.path for f in finals.values()])

    b, s = cfg.latency.reward_shape
    teacher_params = sum(p.numel() for p in ws.teacher.model.parameters())
    rows = []
    for r in table.to_dict("records"):
        role, arch = r["role"], r["arch"]
        ms = teacher_ms if role == "teacher" else latency_profile(ws, StudentArch.from_name(arch)).latency_ms
        final = finals.get(arch)
        rows.append({"row": "teacher" if role == "teacher" else f"{archs[arch]}: {role}",
                     "arch": arch or f"{ws.teacher.num_layers}x{ws.teacher.hidden}",
                     "speedup_fp32": teacher_ms / ms, "params_m": r["params_m"],
                     "params_pct_teacher": 100 * r["params_m"] * 1e6 / teacher_params,
                     "file_mb": folder_mb(final.path) if final is not None and role == "student" else None,
                     **{c: v for c, v in r.items() if c.endswith((".recall@1", ".mrr"))},
                     "summary": r.get("summary"), "summary_se": r.get("summary_se")})
    slim = pd.DataFrame(rows)
    stem = args.out / (args.name or "multilingual")
    slim.to_csv(stem.with_suffix(".csv"), index=False)
    teacher = table.iloc[0]
    kept = [f"- {t['task']}: {t['size']}" for t in describe_tasks(ws)]
    md = [*header("Multilingual students", __file__, argv, cfg), "",
          f"Config {args.config}{' (--smoke: tiny random teacher and sizes)' if args.smoke else ''}: teacher "
          f"{cfg.teacher.name}, corpus {cfg.data.source} {cfg.data.languages}, "
          f"student.vocab {cfg.student.vocab}, search {cfg.search.episodes} x {cfg.search.candidates_per_episode}. "
          f"Latency: ONNX Runtime fp32, batch {b} x {s}, teacher {teacher_ms:.1f} ms.\n",
          "Tasks (each held out from the corpus):", *kept, "",
          markdown_table(slim.drop(columns=[c for c in slim.columns if c.endswith(".mrr")])), "",
          "## Against the target (≥ 5x fp32 and ≥ 90 % of the teacher's recall@1 on every pair)\n"]
    recall = [c for c in slim.columns if c.endswith(".recall@1")]
    for r in slim[slim.row.str.endswith(": student")].to_dict("records"):
        shares = {c.split(".")[0]: r[c] / teacher[c] for c in recall if teacher[c]}
        if not shares:
            md.append(f"- {r['row']} {r['arch']}: the teacher's recall@1 is 0 on every pair: no share to check.")
            continue
        worst = min(shares, key=shares.get)
        met = r["speedup_fp32"] >= 5 and shares[worst] >= 0.9
        md.append(f"- {r['row']} {r['arch']}: {r['speedup_fp32']:.1f}x, {r['params_pct_teacher']:.0f} % of the "
                  f"teacher's parameters, lowest share of the teacher's recall@1 {100 * shares[worst]:.0f} % "
                  f"({worst}): {'met' if met else 'missed'}.")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return stem.with_suffix(".md")


# ---------------------------------------------------------------------------------------- recipe


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _share(value: float, teacher: float) -> float:
    return value / teacher if teacher else float("nan")


def recipe(args, argv: list[str]) -> Path:
    raw = base_config(args)
    arch = StudentArch.from_name(args.arch)
    work = args.out / "work" / "multilingual-recipe" if args.smoke else ROOT / "runs" / "multilingual-recipe"
    started = time.time()
    parts, ws, configs = [], None, {}
    for name in args.recipes:
        overrides = {"tracking.enabled": False, "data.train_size": args.train_texts,
                     "distill.final": {**raw.get("distill", {}).get("final", {}), "epochs": args.epochs},
                     # one folder per recipe and corpus size, so a larger run keeps the smaller one's students
                     "paths.output_dir": str(work / (
                         slug(name) + ("" if (args.train_texts, args.epochs) == (2000, 1)
                                       else f"-{args.train_texts}x{args.epochs}"))),
                     "evaluate.tasks": [{**t, "test_size": args.test_size} for t in raw["evaluate"]["tasks"]],
                     **RECIPES[name]}
        # apply_overrides returns a new dict: one recipe's overrides never carry into the next.
        cfg = config_from_dict(apply_overrides(raw, overrides), args.config)
        configs[name] = cfg
        # One teacher for every recipe: the workspace is rebuilt around it (the recipe changes
        # the distillation, not the teacher or its cached states).
        ws = Workspace(cfg, ws.teacher) if ws is not None else Workspace.prepare(cfg)
        print(f"recipe {name}: {arch.name}", flush=True)
        final = final_student(cfg, ws, arch)
        table = evaluate_students(ws, [final.path])
        table["recipe"] = [name if role == "student" else role for role in table.role]
        table["final_L_HS"] = [final.result.final_eval_loss if role == "student" else None for role in table.role]
        parts.append(table if not parts else table[table.role == "student"])
    full = pd.concat(parts, ignore_index=True)
    recall = [c for c in full.columns if c.endswith(".recall@1")]
    teacher = full[full.role == "teacher"].iloc[0]
    slim = full[["recipe", "params_m", *recall, "summary", "summary_se"]].copy()
    slim["worst_share"] = [min(_share(r[c], teacher[c]) for c in recall) for _, r in full.iterrows()]
    slim["mean_share"] = [sum(_share(r[c], teacher[c]) for c in recall) / len(recall) for _, r in full.iterrows()]
    slim["final_L_HS"] = full["final_L_HS"]
    stem = args.out / (args.name or "multilingual-recipe")
    full.to_csv(stem.with_suffix(".csv"), index=False)
    md = [*header("Multilingual recipes", __file__, argv, configs), "",
          f"Config {args.config}{' (--smoke: tiny random teacher and sizes)' if args.smoke else ''}: teacher "
          f"{configs[args.recipes[0]].teacher.name}, student {arch.name} cut from it, final "
          f"distillation on {args.train_texts} texts of the recipe's corpus x {args.epochs} epoch(s), {time.time() - started:.0f} s.\n",
          "Tasks (each held out from the corpus):", *[f"- {t['task']}: {t['size']}" for t in describe_tasks(ws)], "",
          "recall@1 per direction; worst_share / mean_share = the row's recall@1 as a share of the teacher's, "
          "lowest and mean over the directions; summary = mean gap closed over the tasks against the untrained "
          "floor ± SE; final_L_HS = held-out hidden-state KD loss (not comparable across recipes whose loss "
          "terms differ).\n",
          markdown_table(slim), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return stem.with_suffix(".md")


# ---------------------------------------------------------------------------------------- proxy


def proxy(args, argv: list[str]) -> Path:
    raw = base_config(args)
    rows, teacher, configs = [], None, {}
    for seed in args.seeds:
        cfg = config_from_dict(apply_overrides(raw, {"tracking.enabled": False, "seed": seed}), args.config)
        configs[f"seed {seed}"] = cfg
        ws = Workspace(cfg, teacher) if teacher is not None else Workspace.prepare(cfg)
        teacher = ws.teacher
        evaluator = ProxyEvaluator(ws, progress=False)
        for name in args.archs:
            r = evaluator.distill(StudentArch.from_name(name), progress=False)
            rows.append({"arch": name, "seed": seed, "proxy_loss": r.kd_loss})
            print(rows[-1], flush=True)
    full = pd.DataFrame(rows)
    table = full.groupby("arch", sort=False).proxy_loss.agg(["mean", "std", "min", "max"]).reset_index()
    stem = args.out / (args.name or "multilingual-proxy-seeds")
    full.to_csv(stem.with_suffix(".csv"), index=False)
    md = [*header("Multilingual proxy loss across seeds", __file__, argv, configs), "",
          f"Config {args.config}{' (--smoke: tiny random teacher and sizes)' if args.smoke else ''}, seeds "
          f"{args.seeds}: each seed its own splits and student start.\n",
          markdown_table(table), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return stem.with_suffix(".md")


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subs = ap.add_subparsers(dest="command", required=True)

    def sub(name: str, help: str, smoke_help: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=help)
        p.add_argument("--config", default="configs/multilingual.yaml")
        p.add_argument("--name", default=None, help="the report's file name without suffix")
        add_common_args(p, RESULTS, smoke_help)
        return p

    t = sub("table", "KD-NAS picks and the layer-dropped teacher on translation retrieval (multilingual.md)",
            "search 1 x 2 on a tiny random teacher")
    t.add_argument("--episodes", type=int, default=None)
    t.add_argument("--candidates", type=int, default=None)
    t.add_argument("--train-texts", type=int, default=None)
    t.add_argument("--test-size", type=int, default=None, help="pairs per translation task")

    r = sub("recipe", "one student cut from the teacher, distilled with each recipe (multilingual-recipe.md)",
            f"{SMOKE_ARCH}, recipes {'; '.join(SMOKE_RECIPES)}")
    r.add_argument("--arch", default=None, help="the student (default: L6-H256-A8-F1536-gelu, the 0.2x pick of "
                   "bench/results/archive/multilingual-fortunes.md, L6-H256-A4-F1536, with heads as narrow as the "
                   "teacher's)")
    r.add_argument("--recipes", nargs="+", default=None, choices=list(RECIPES), help="default: every recipe")
    r.add_argument("--train-texts", type=int, default=None, help="default 2000 (--smoke: 64)")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--test-size", type=int, default=None, help="pairs per translation task (default 500; --smoke: 100)")

    x = sub("proxy", "the search's proxy loss of some students over seeds (multilingual-proxy-seeds.md)",
            f"{' and '.join(SMOKE_ARCHS)}, seeds 0 1")
    x.add_argument("--archs", nargs="+", default=None,
                   help="default: L6-H384-A12-F256-gelu and L6-H256-A8-F1536-gelu, the 0.2x pick of "
                        "bench/results/multilingual.md and the hand-picked student")
    x.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2")

    args = ap.parse_args(argv)
    args.out = out_folder(args.out, args.smoke, RESULTS)
    if args.command == "recipe":
        args.arch = args.arch or (SMOKE_ARCH if args.smoke else "L6-H256-A8-F1536-gelu")
        args.recipes = args.recipes or (SMOKE_RECIPES if args.smoke else list(RECIPES))
        args.train_texts = args.train_texts or (64 if args.smoke else 2000)
        args.test_size = args.test_size or (100 if args.smoke else 500)
        return recipe(args, argv)
    if args.command == "proxy":
        args.archs = args.archs or (SMOKE_ARCHS if args.smoke else ["L6-H384-A12-F256-gelu", "L6-H256-A8-F1536-gelu"])
        args.seeds = args.seeds or ([0, 1] if args.smoke else [0, 1, 2])
        return proxy(args, argv)
    return table(args, argv)


if __name__ == "__main__":
    main()
