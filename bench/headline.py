"""Headline benchmark: KD-NAS students vs the teacher, an off-the-shelf model, hand-picked
students and random search, side by side in one run on one machine.

Every student row is distilled with the same recipe and budget (same train texts, epochs,
teacher-state cache); every row is timed back to back (ONNX Runtime, 1 thread) and scored on the
same held-out texts: linear-probe accuracy / macro-F1, % of teacher, gap closed over its own
untrained floor (± paired-bootstrap standard error), teacher-neighbour recall@10 and CKA.

    python -m bench.headline           # mpnet-base teacher (configs/benchmark.yaml)
    python -m bench.headline --small   # MiniLM-L6 teacher (configs/default.yaml)
    python -m bench.headline --smoke   # tiny random teacher: correctness only (tests)

Scale knobs (--train-texts, --final-epochs, --proxy-texts, --episodes, --candidates,
--probe-train, --test-texts) trade time for fidelity; the report states the values used.
Writes bench/results/headline-<variant>.{md,csv,png}; work files (searches, distilled students,
cached teacher states and embeddings) go to runs/headline-<variant>/ so a rerun resumes.

Two variants of the table at the same scale, teacher, tasks, floors and seed (each of the
three sizes above; --name sets the report's file name):

    python -m bench.headline --head-width     # students cut from the teacher at each head count,
                                              # scored before any distillation (head-width.{md,csv})
    python -m bench.headline --head-width --shapes L3-H384-F768-gelu L3-H384-F768-silu --heads 12 \
        --name activation-inherit             # the same question for the activation
    python -m bench.headline --init-heads-ab  # rows distilled again with this checkout's start of the
                                              # projection heads, beside --before (init-heads-ab.md)

--head-width: a student head wider than the teacher's lays several teacher heads side by side
in one softmax, which is not an attention pattern the teacher ever computed; narrower or equal
heads keep one teacher head each. It reuses the headline's work folder (teacher states and
embeddings). --init-heads-ab: the truncated teacher (its first layer) and the --archs rows,
distilled with ``inherit.init_projections`` as this checkout has it, everything else equal;
'before' rows come from --before (default: this variant's headline csv in --out, when present).
"""

from __future__ import annotations

from bench.common import (
    GENERAL_MIX,
    RANDOM_INIT_FINAL,
    RESULTS,
    ROOT,
    OncePerArch,
    add_common_args,
    add_precision_arg,
    argv_of,
    final_distilled,
    finished_student,
    header,
    out_folder,
    smoke_config,
)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import dataclasses  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from kdnas_core.config import (  # noqa: E402
    KDNASConfig,
    TeacherConfig,
    apply_overrides,
    config_from_dict,
)
from kdnas_core.hardware import precision_name  # noqa: E402
from kdnas_core.evaluation.evaluate import (  # noqa: E402
    ModelEval,
    compare,
    evaluate_encoder,
    evaluate_model,
)
from kdnas_core.search.candidates import ProxyEvaluator, teacher_latency  # noqa: E402
from kdnas_core.final import export_student  # noqa: E402
from kdnas_core.onnx_embedder import OnnxEmbedder  # noqa: E402
from kdnas_core.inherit import full_width, select_layers  # noqa: E402
from kdnas_core.latency import profile_model  # noqa: E402
from kdnas_core.search.reports import markdown_table  # noqa: E402
from kdnas_core.search.signals import zero_cost_screen  # noqa: E402
from kdnas_core.search.space import StudentArch  # noqa: E402
from kdnas_core.search.runner import search_in_folder  # noqa: E402
from kdnas_core.student import build_student, save_student, untrained_floor  # noqa: E402
from kdnas_core.evaluation.table import PRIMARY, describe_tasks, evaluate_static  # noqa: E402
from kdnas_core.teachers.loading import load_teacher  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402

# Per variant: base config and default scale. "full" is the mpnet-base benchmark, cut to
# what a 2-core CPU runs in about an hour; each knob is a flag.
VARIANTS = {
    "full": dict(config="configs/benchmark.yaml", train_texts=4000, final_epochs=2, proxy_texts=500,
                 proxy_epochs=2, episodes=3, candidates=4, probe_train=3000, test_texts=5000,
                 pairs=2000, budgets=["0.1x", "0.2x"], runs=20),
    "small": dict(config="configs/default.yaml", train_texts=4000, final_epochs=2, proxy_texts=256,
                  proxy_epochs=2, episodes=3, candidates=4, probe_train=3000, test_texts=5000,
                  pairs=2000, budgets=["0.25x", "0.5x"], runs=20),
    "smoke": dict(config=None, train_texts=160, final_epochs=1, proxy_texts=48, proxy_epochs=1,
                  episodes=1, candidates=2, probe_train=100, test_texts=100, pairs=100, budgets=["0.9x", "1000ms"],
                  runs=3),
}


@dataclass
class Row:
    name: str
    kind: str  # teacher | off-the-shelf | hand-picked | random-search | kd-nas | floor | kd-nas int8
    arch: str
    model: torch.nn.Module | None = None
    tokenizer: object = None
    floor: Row | None = None
    distil: bool = False
    note: str = ""
    latency: dict = field(default_factory=dict)
    eval: ModelEval | None = None
    result: dict = field(default_factory=dict)
    init_heads: object = None  # projection heads a teacher-initialised student starts with
    inherited: Row | None = None  # a teacher-initialised row before distillation
    cut: str | None = None  # which teacher layers a teacher-initialised row kept (student.layers)
    path: Path | None = None  # a model2vec folder


# ---------------------------------------------------------------------------------------- set-up


def make_config(args, scale: dict, work: Path) -> KDNASConfig:
    """The variant's config (the smoke run's: a tiny random BERT teacher and real tweets) at
    ``scale``, its searches and students under ``work``."""
    base = smoke_config(work) if args.smoke else yaml.safe_load((ROOT / scale["config"]).read_text())
    overrides = {
        "paths.output_dir": str(work),
        "data.train_size": scale["train_texts"],
        "data.proxy_size": scale["proxy_texts"],
        # One key each: a whole section here would drop the config's other settings (eval_every).
        "distill.final.epochs": scale["final_epochs"],
        "distill.proxy.epochs": scale["proxy_epochs"],
        "distill.proxy.lr": 1e-3,
        "search.episodes": scale["episodes"],
        "search.candidates_per_episode": scale["candidates"],
        "latency.backends": ["ort-fp32", "ort-int8"],
        "latency.runs": scale["runs"],
        "reward.budgets": scale["budgets"],
        # The default task list (classification, retrieval, clustering) at this scale's sizes.
        "evaluate.tasks": [
            {"test_size": scale["test_texts"], "train_size": scale["probe_train"]},
            {"kind": "retrieval", "source": "packaged", "path": "bible-paraphrase", "test_size": scale["pairs"]},
            {"kind": "clustering", "source": "packaged", "path": "chatterbot-topics", "test_size": scale["pairs"]},
        ],
        "tracking.enabled": False,
    }
    if args.cache_dir:
        overrides["paths.cache_dir"] = str(args.cache_dir)
    if getattr(args, "precision", None):  # searches and final distillations alike
        overrides["distill.precision"] = args.precision
    if getattr(args, "mix", False) and not args.smoke:  # the search's proxy texts come from the mix too
        overrides |= {"data.source": "mix", "data.path": None, "data.mix": GENERAL_MIX}
    return config_from_dict(apply_overrides(base, overrides), "headline benchmark config")


def quick_latency(model, cfg: KDNASConfig) -> float:
    """fp32 latency at the first grid shape with few runs: only to choose hand-picked shapes."""
    lat = cfg.latency.model_copy(update={"backends": ["ort-fp32"], "runs": 8, "reward_backend": "ort-fp32"})
    b, s = lat.reward_shape
    return profile_model(model, lat).median("ort-fp32", b, s)


def inherited_row(ws: Workspace, arch: StudentArch, name: str, kind: str, note: str = "") -> Row:
    """A student cut from the teacher as ``ws`` cuts them, distilled, with its untrained random
    floor and its "inherited, not distilled" start."""
    start = ws.start_student(arch)
    row = Row(name, kind, arch.name, start.model, distil=True, note=note, init_heads=start.init_heads,
              cut=ws.cfg.student.layers)
    row.inherited = Row(f"{name}: inherited, not distilled", "inherited", arch.name, ws.build_student(arch))
    with_floor(row, ws.untrained_student(arch, ws.cfg.seed))
    row.inherited.floor = row.floor  # scored against the same floor; listed once, under its student
    return row


def static_row(ws: Workspace, work: Path) -> Row | None:
    """A model2vec static model distilled from the same teacher: the peer users pick for raw
    speed. Needs the `baselines` extra: model2vec and skeletoken, not model2vec's own `distill`
    extra, which pins an older transformers."""
    try:
        from model2vec.distill import distill as static_distill
    except ImportError as err:
        print(f"no model2vec row: {err}", flush=True)
        return None
    from kdnas_core.teachers.loading import _resolve_path

    folder = work / "model2vec"
    dims = min(256, ws.teacher.hidden)
    if not (folder / "config.json").is_file():
        print("distilling a model2vec static model", flush=True)
        static_distill(model_name=_resolve_path(ws.cfg.teacher.name, ws.cfg.paths.cache_path()),
                       pca_dims=dims).save_pretrained(str(folder))
    row = Row(f"model2vec static model of {ws.cfg.teacher.name} ({dims} dims)", "static", f"static-{dims}", path=folder)
    row.floor = Row(f"{row.name}: random vectors", "floor", row.arch)
    return row


def time_static(row: Row, ws: Workspace) -> None:
    """A static model's encode() on the reward shape's batch of texts, 1 thread, median: it is
    not an ONNX graph, so this stands in its fp32 and int8 columns."""
    from model2vec import StaticModel
    from threadpoolctl import threadpool_limits

    b, s = ws.cfg.latency.reward_shape
    model = StaticModel.from_pretrained(str(row.path))
    words = " ".join(ws.splits.eval[:50]).split()
    texts = [" ".join(words[i * s: (i + 1) * s]) for i in range(b)]
    runs = []
    with threadpool_limits(1):
        for _ in range(ws.cfg.latency.warmup + ws.cfg.latency.runs):
            t0 = time.perf_counter()
            model.encode(texts)
            runs.append((time.perf_counter() - t0) * 1000)
    ms = float(np.median(runs[ws.cfg.latency.warmup:]))
    row.latency = {"ort-fp32": {f"{b}x{s}": ms}, "ort-int8": {f"{b}x{s}": ms}}
    row.note = "latency: numpy encode(), not ONNX"


def hand_picked(ws: Workspace, target_ms: float, seed: int) -> list[Row]:
    """Students a practitioner would pick by hand, sized to about the KD-NAS pick's latency."""
    t = ws.teacher
    heads = t.config.num_attention_heads
    rows = []
    # MiniLM's recipe: half the teacher's depth and width, the teacher's head count.
    h = max(heads, (t.hidden // 2) // heads * heads)
    mini = StudentArch(max(1, t.num_layers // 2), h, heads, 4 * h, "gelu")
    rows.append(Row(f"hand-picked {mini.name} (MiniLM shape)", "hand-picked", mini.name,
                    build_student(mini, t, seed), distil=True))
    # The teacher with as many layers as fit the pick's latency (at least one): its first k
    # (truncated) and k evenly spread (layer-dropped), full width, then distilled.
    best_k, best_gap = 1, float("inf")
    for k in range(1, t.num_layers + 1):
        ms = quick_latency(ws.untrained_student(full_width(ws.teacher.config, k)), ws.cfg)
        if abs(ms - target_ms) < best_gap:
            best_k, best_gap = k, abs(ms - target_ms)
        if ms > target_ms:
            break
    kept = []
    for how, label in (("first", "truncated teacher: its first"), ("uniform", "layer-dropped teacher: evenly spread")):
        # At one layer both cuts keep layer 0: the same student, distilled and scored once.
        layers = select_layers(t.num_layers, best_k, how)
        if layers in kept:
            continue
        kept.append(layers)
        wsl = Workspace(ws.cfg.model_copy(update={"student": ws.cfg.student.model_copy(update={"layers": how})}), ws.teacher)
        rows.append(inherited_row(wsl, full_width(ws.teacher.config, best_k), f"{label} {best_k} layer(s)", "hand-picked"))
    # Deep and narrow: the teacher's depth, the width whose latency is closest to the pick's.
    options = []
    for width in (32, 64, 96, 128, 192, 256, 384, 512):
        if width >= t.hidden:
            break
        a = StudentArch(t.num_layers, width, max(1, width // 64) if width >= 64 else 2, 4 * width, "gelu")
        options.append((abs(quick_latency(build_student(a, t, seed), ws.cfg) - target_ms), a))
    if options:
        narrow = min(options, key=lambda o: o[0])[1]
        rows.append(Row(f"hand-picked {narrow.name} (teacher depth, narrow)", "hand-picked", narrow.name,
                        build_student(narrow, t, seed), distil=True))
    return rows


def with_floor(row: Row, floor_model, label: str = "untrained") -> Row:
    row.floor = Row(f"{row.name}: {label}", "floor", row.arch, floor_model, row.tokenizer)
    return row


# ---------------------------------------------------------------------------------------- phases


def run_searches(ws: Workspace, cfg: KDNASConfig, teacher_ms: float, random_init: bool = True):
    """KD-NAS (LSTM controller) and random search with the same number of distilled candidates;
    an architecture both visit is distilled once (evaluation is deterministic per arch). With
    ``random_init``, KD-NAS once more with random-init students (None otherwise)."""
    proxy = ProxyEvaluator(ws)
    evaluate = OncePerArch(proxy)
    # KD-NAS as the config runs it, the zero-cost screen included where search.screen is on;
    # random search distils what it samples, unscreened (its baseline role in bench.search_real).
    screen = zero_cost_screen(lambda: proxy.probe, cfg.search.screen_signal, progress=True) if cfg.search.screen else None
    kdnas = search_in_folder(cfg, ws.space, teacher_ms, evaluate=evaluate, screen=screen)
    rcfg = cfg.model_copy(update={"controller": cfg.controller.model_copy(update={"kind": "random"}),
                                  "search": cfg.search.model_copy(update={"screen": 0})})
    rnd = search_in_folder(rcfg, ws.space, teacher_ms, evaluate=evaluate)
    n_distinct = len({o.arch.arch_id for o in kdnas.observations + rnd.observations})
    if not random_init:
        return kdnas, rnd, None, n_distinct, len(evaluate.results)
    # KD-NAS as it was before teacher-initialised students: random BERT students throughout.
    icfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"init": "random"})})
    evaluate_random = OncePerArch(ProxyEvaluator(Workspace(icfg, ws.teacher)))
    kdnas_random = search_in_folder(icfg, ws.space, teacher_ms, evaluate=evaluate_random)
    return kdnas, rnd, kdnas_random, n_distinct, len(evaluate.results) + len(evaluate_random.results)


def distil_rows(ws: Workspace, rows: list[Row], work: Path) -> int:
    """Full-corpus distillation of every student row with one shared teacher-state cache; each
    result is saved (safetensors) so a rerun skips finished students. Students cut from the
    teacher get the config's final recipe; random-init ones the recipe for them (``for_random_init``)."""
    todo = [r for r in rows if r.distil]
    distilled = 0
    # States and batches built once per recipe (neighbours: one k-means); each reads the teacher
    # layers its own loss needs. Random-init students first: their recipe reads every layer, and
    # the cut students' (the last layer only) is then read from that cache, not a second teacher pass.
    recipes: dict[bool, tuple] = {}
    finished: dict[str, tuple] = {}
    for cut in sorted({r.inherited is not None for r in todo}):
        w = ws if cut else for_random_init(ws)
        group = [r for r in todo if (r.inherited is not None) == cut]
        for r in group:
            done = finished_student(w, work / "students" / _slug(r.name))
            if done is not None:
                finished[r.name] = done
        if all(r.name in finished for r in group):
            continue  # a resumed run whose students of this recipe all finished needs no teacher pass
        layers = w.layers_for(sorted({r.model.config.num_hidden_layers for r in group}), "final")
        states = w.cached_states("train", layers)
        recipes[cut] = (w, w.distill_batches("train", states), states, w.eval_states(layers))
    for r in todo:
        if r.name in finished:
            r.model, r.result = finished[r.name]
            continue
        w, batches, states, eval_states = recipes[r.inherited is not None]
        print(f"distilling {r.name}", flush=True)
        distilled += 1
        r.model, r.result = final_distilled(w, r.model, batches, states, eval_states, r.init_heads,
                                            work / "students" / _slug(r.name))
    return distilled


def for_random_init(ws: Workspace) -> Workspace:
    """``ws`` without the final path's pooled_relation, batching and hidden_mse overrides: they keep
    what a cut student inherited, but a random-init student has nothing to keep, and with the first
    two the MiniLM-shape and narrow hand-picks lost 0.20 and 0.07 summary
    (archive/headline-full-2026-12-06-neighbours.md); a user distilling such a student would leave
    them off (the pooled term alone was measured on cut students only)."""
    final = ws.cfg.distill.final
    if final.pooled_relation is None and final.batching is None and final.hidden_mse is None:
        return ws
    cfg = config_from_dict(apply_overrides(ws.cfg.model_dump(mode="json"), RANDOM_INIT_FINAL), "random-init rows")
    return dataclasses.replace(ws, cfg=cfg)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:80]


def time_rows(rows: list[Row], cfg: KDNASConfig) -> None:
    """All rows timed back to back, before any distillation: weights do not change latency, and
    nothing else runs on the machine meanwhile."""
    for r in rows:
        if r.model is None or r.latency:
            continue
        print(f"timing {r.name}", flush=True)
        rep = profile_model(r.model, cfg.latency)
        r.latency = {b: {shape: st.median_ms for shape, st in res.items()} for b, res in rep.results.items()}


def evaluate_rows(ws: Workspace, rows: list[Row], int8_of: Row | None, work: Path) -> None:
    e, seed = ws.cfg.evaluate, ws.cfg.seed
    max_len = e.max_length or ws.cfg.data.max_length
    cache = ws.cfg.paths.cache_path() / "embeddings"
    for r in rows:
        print(f"evaluating {r.name}", flush=True)
        if r.kind == "static":
            r.eval, r.floor.eval = evaluate_static(ws, r.path)
        elif r.model is None:  # a static model's floor: scored with it
            continue
        elif r.kind == "teacher":
            r.eval = ws.teacher_eval
        else:
            tok = r.tokenizer or ws.teacher.tokenizer
            r.eval = evaluate_model(r.model, tok, r.name, ws.tasks, ws.fidelity_texts, e, max_len, cache, seed,
                                    progress=True)
    if int8_of is not None:
        # The int8 ONNX file a user deploys, saved and exported as a final student is and run as
        # `kdnas embed` and the registered MLflow model run it (OnnxEmbedder: its own tokenizer file).
        folder = work / "onnx" / _slug(int8_of.name)
        if not (folder / "model.int8.onnx").is_file():
            arch = StudentArch.from_name(int8_of.arch)
            save_student(int8_of.model.encoder, ws.teacher.tokenizer, arch, folder, head=int8_of.model.head)
            export_student(folder, ws.cfg.latency)
        embedder = OnnxEmbedder(folder, "int8", batch_size=e.batch_size)
        row = Row(f"{int8_of.name}, int8 ONNX", "kd-nas int8", int8_of.arch, None, floor=int8_of.floor)
        row.eval = evaluate_encoder(embedder, row.name, ws.tasks, ws.fidelity_texts, e, seed, int8_of.eval.params)
        row.latency = {"ort-int8": int8_of.latency.get("ort-int8", {})}
        rows.insert(rows.index(int8_of) + 1, row)


# ---------------------------------------------------------------------------------------- report


def table(rows: list[Row], teacher: Row, cfg: KDNASConfig) -> pd.DataFrame:
    b, s = cfg.latency.reward_shape
    shape = f"{b}x{s}"
    t_fp32 = teacher.latency["ort-fp32"][shape]
    out = []
    for r in rows:
        floor = r.floor.eval if r.floor is not None and r.floor.eval is not None else None
        d = compare(r.eval, teacher.eval, floor if r.kind not in ("teacher", "floor") else None,
                    cfg.evaluate, cfg.seed)
        fp32 = r.latency.get("ort-fp32", {}).get(shape)
        int8 = r.latency.get("ort-int8", {}).get(shape)
        d |= {"model": r.name, "kind": r.kind, "arch": r.arch,
              "fp32_ms": fp32, "int8_ms": int8,
              "speedup_fp32": t_fp32 / fp32 if fp32 else None, "speedup_int8": t_fp32 / int8 if int8 else None,
              "note": r.note}
        for extra_shape in list(r.latency.get("ort-fp32", {}))[1:]:
            d[f"fp32_ms_{extra_shape}"] = r.latency["ort-fp32"][extra_shape]
        out.append(d)
    return pd.DataFrame(out)


def _pm(values, ses) -> list[str]:
    return [f"{g:.3f} ± {se:.3f}" if isinstance(g, float) and np.isfinite(g) else "" for g, se in zip(values, ses)]


def render(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Per task its gap closed, then the summary with its interval, % of teacher, fidelity."""
    shown = df.copy()
    for t in tasks:
        shown[t] = _pm(df.get(f"{t}.gap_closed", [np.nan] * len(df)), df.get(f"{t}.gap_closed_se", [np.nan] * len(df)))
    shown["summary"] = [f"{v} [{lo:.2f}, {hi:.2f}]" if v else "" for v, lo, hi in
                        zip(_pm(df.get("summary", [np.nan] * len(df)), df.get("summary_se", [np.nan] * len(df))),
                            df.get("summary_lo", [np.nan] * len(df)), df.get("summary_hi", [np.nan] * len(df)))]
    shown["pct_teacher"] = [f"{100 * v:.1f}" for v in df.summary_pct_teacher]
    for c in ("fp32_ms", "int8_ms", "speedup_fp32", "speedup_int8"):
        shown[c] = [f"{v:.2f}" if isinstance(v, float) and np.isfinite(v) else "" for v in df[c]]
    cols = ["model", "params_m", "fp32_ms", "int8_ms", "speedup_fp32", "speedup_int8", *tasks, "summary",
            "pct_teacher", "dropin", "recall@10", "cka", "cosine"]
    if "dropin" in df:  # teacher-built index queried by the row: % of the teacher's recall@10
        shown["dropin"] = [f"{100 * v:.1f}" if isinstance(v, float) and np.isfinite(v) else "" for v in df["dropin"]]
    return shown[[c for c in cols if c in shown.columns]]


def verdicts(df: pd.DataFrame) -> list[str]:
    """The issue's targets, checked on this run's table."""
    out = []
    picks = df[df.kind == "kd-nas"]
    rivals = df[df.kind.isin(["hand-picked", "random-search", "kd-nas random init", "static"])]
    for _, p in picks.iterrows():
        # The two targets: >= 0.90 gap closed at >= 10x, >= 0.80 at >= 20x.
        goal, speed = (0.8, 20) if p.speedup_fp32 >= 20 else (0.9, 10)
        out.append(f"- KD-NAS {p.arch}: {p.speedup_fp32:.1f}x fp32 speed-up, summary gap closed "
                   f"{p.summary:.3f} ± {p.summary_se:.3f}, {100 * p.summary_pct_teacher:.1f} % of the "
                   f"teacher's scores. Target ≥{speed}x and ≥{goal:.2f} gap closed: "
                   f"{'met' if p.speedup_fp32 >= speed and p.summary >= goal else 'missed'}.")
        dropin = p.get("dropin", np.nan)
        if isinstance(dropin, float) and np.isfinite(dropin):
            out.append(f"  - drop-in retrieval (teacher-built index, student queries): {100 * dropin:.1f} % of the "
                       f"teacher's recall@10. Target ≥90 % at ≥10x: "
                       f"{'met' if dropin >= 0.9 and p.speedup_fp32 >= 10 else 'missed'}.")
        near = rivals[(rivals.fp32_ms <= 1.25 * p.fp32_ms) & (rivals.fp32_ms >= 0.75 * p.fp32_ms)]
        for _, r in rivals.iterrows():
            eq = "within ±25 % latency" if r.model in set(near.model) else f"latency {r.fp32_ms / p.fp32_ms:.2f}x the pick's"
            diff = p.summary - r.summary
            se = float(np.hypot(p.summary_se, r.summary_se))
            gap = (f"gap closed {'higher' if diff > 0 else 'lower'} by {diff:+.3f} (±{se:.3f}, unpaired)"
                   if np.isfinite(diff) else "gap closed undefined for one of them (teacher = floor)")
            beat_rec = p["recall@10"] > r["recall@10"]
            out.append(f"  - vs {r.model} ({eq}): {gap}, recall@10 {'higher' if beat_rec else 'lower'} "
                       f"({p['recall@10']:.3f} vs {r['recall@10']:.3f})")
    for _, q in df[df.kind == "kd-nas int8"].iterrows():
        base = df[(df.kind == "kd-nas") & (df.arch == q.arch)].iloc[0]
        out.append(f"- int8 ONNX of {q.arch}: {q.speedup_int8:.1f}x vs teacher fp32; summary gap closed "
                   f"{q.summary:.3f} vs {base.summary:.3f} fp32 ({q.summary - base.summary:+.3f}). "
                   f"Target ≥14x at the same quality: "
                   f"{'met' if q.speedup_int8 >= 14 and q.summary >= base.summary - 2 * base.summary_se else 'missed'}.")
    return out


def against_start(df: pd.DataFrame, rows: list[Row], tasks: list[str]) -> list[str]:
    """Each distilled student against its own inherited, undistilled start: the held-out KD loss
    on corpus texts, and every task's gap closed (both scored against the same floor; ± unpaired
    SE). A task where the student is lower is named, however small the difference."""
    by_name = {r["model"]: r for r in df.to_dict("records")}
    out = []
    for row in rows:
        if row.inherited is None or row.model is None:
            continue
        r, base = by_name[row.name], by_name[row.inherited.name]
        below = [f"{t} ({r[f'{t}.gap_closed'] - base[f'{t}.gap_closed']:+.3f} ± "
                 f"{np.hypot(r[f'{t}.gap_closed_se'], base[f'{t}.gap_closed_se']):.3f})"
                 for t in tasks if r.get(f"{t}.gap_closed", np.nan) < base.get(f"{t}.gap_closed", np.nan)]
        loss = row.result or {}
        kd = (f"held-out KD loss {loss['initial_eval_loss']:.3f} -> {loss['final_eval_loss']:.3f}; "
              if "initial_eval_loss" in loss and "final_eval_loss" in loss else "")
        out.append(f"- {row.arch} ({row.kind}): {kd}summary {r['summary'] - base['summary']:+.3f} over its start; "
                   + (f"below its start on {', '.join(below)}" if below else "at or above its start on every task"))
    return out


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"teacher": "black", "off-the-shelf": "tab:purple", "hand-picked": "tab:orange",
              "random-search": "tab:green", "kd-nas": "tab:blue", "floor": "tab:gray", "kd-nas int8": "tab:cyan",
              "kd-nas random init": "tab:red", "inherited": "tab:olive", "static": "tab:brown"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for _, r in df.iterrows():
        ms = r.fp32_ms if isinstance(r.fp32_ms, float) and np.isfinite(r.fp32_ms) else r.int8_ms
        y, yerr = {"teacher": (1.0, 0.0), "floor": (0.0, 0.0)}.get(r.kind, (r.summary, 1.96 * r.summary_se))
        if not np.isfinite(y):
            continue
        ax.errorbar([ms], [y], yerr=[yerr], fmt="o", color=colors.get(r.kind, "k"),
                    mfc="none" if r.kind == "floor" else colors.get(r.kind, "k"), capsize=3, alpha=0.5 if r.kind == "floor" else 1)
        if r.kind != "floor":  # floors sit below their student: the hollow marker says enough
            label = {"teacher": "teacher", "off-the-shelf": "MiniLM-L6 as shipped"}.get(r.kind, str(r.arch).split(" (")[0])
            label += " int8" if r.kind == "kd-nas int8" else ""
            ax.annotate(label, (ms, y), fontsize=7, xytext=(5, 4), textcoords="offset points")
    for kind, c in colors.items():
        if (df.kind == kind).any():
            ax.scatter([], [], color=c, label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("ONNX Runtime CPU latency, 1 thread, ms (log; int8 rows at their int8 latency)")
    ax.set_ylabel("summary gap closed over the tasks (±95 %); teacher 1, floors 0")
    ax.set_title("Quality vs latency: every row of the headline table (hollow: untrained floors)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main


# ---------------------------------------------------------------------------------------- variants


def arch_with_heads(shape: str, heads: int) -> StudentArch | None:
    """``L6-H384-F512-gelu`` with ``heads`` heads, or None where the width does not split evenly."""
    layers, hidden, ffn, act = shape.split("-")
    h = int(hidden[1:])
    if h % heads:
        return None
    return StudentArch.from_name(f"{layers}-{hidden}-A{heads}-{ffn}-{act}")


def head_width(args, cfg: KDNASConfig, ws: Workspace, work: Path, variant: str, argv: list[str]) -> Path:
    """Students cut from the teacher with each head count (same layers, width and FFN), scored
    before any distillation against their untrained floors."""
    shapes = args.shapes or VARIANT_DEFAULTS[variant]["shapes"]
    heads = args.heads or VARIANT_DEFAULTS[variant]["heads"]
    d_t = ws.teacher.config.hidden_size // ws.teacher.config.num_attention_heads
    teacher = Row(f"teacher {cfg.teacher.name}", "teacher", "", ws.teacher.model)
    rows = []
    for shape in shapes:
        for a in heads:
            arch = arch_with_heads(shape, a)
            if arch is None:
                continue
            row = Row(arch.name, "inherited", arch.name, ws.build_student(arch))
            with_floor(row, ws.untrained_student(arch, cfg.seed))
            row.latency = {"ort-fp32": quick_latency(row.model, cfg)}
            rows.append(row)
    evaluate_rows(ws, [teacher] + [x for r in rows for x in (r, r.floor)], None, work)
    out = []
    for r in rows:
        arch = StudentArch.from_name(r.arch)
        d = compare(r.eval, teacher.eval, r.floor.eval, cfg.evaluate, cfg.seed)
        out.append({"arch": r.arch, "head_dim": arch.hidden // arch.heads,
                    "teacher_heads_per_student_head": round(arch.hidden / arch.heads / d_t, 2),
                    "fp32_ms": round(r.latency["ort-fp32"], 2), "summary": d["summary"],
                    "summary_se": d["summary_se"], **{t.label: d.get(f"{t.label}.gap_closed") for t in ws.tasks},
                    "recall@10": d.get("recall@10")})
    df = pd.DataFrame(out)
    stem = args.out / (args.name or "head-width")
    df.to_csv(stem.with_suffix(".csv"), index=False)
    b, s = cfg.latency.reward_shape
    md = [*header(f"Teacher-initialised students before distillation: {', '.join(shapes)} at "
                  f"{', '.join(map(str, heads))} heads", __file__, argv, cfg), "",
          f"Teacher {cfg.teacher.name} (head width {d_t}); headline-{variant} tasks, floors and seed; "
          "summary = mean gap closed over the tasks of the student cut from the teacher, not distilled; "
          f"fp32_ms: ONNX Runtime, 1 thread, batch {b} x {s}, 8 runs (only to compare rows).\n",
          markdown_table(df), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return stem.with_suffix(".md")


def init_heads_ab(args, cfg: KDNASConfig, ws: Workspace, work: Path, variant: str, argv: list[str]) -> Path:
    """Rows of the headline distilled again with this checkout's ``inherit.init_projections``,
    everything else equal, beside the headline's numbers for them (--before)."""
    archs = args.archs or VARIANT_DEFAULTS[variant]["archs"]
    first = Workspace(cfg.model_copy(update={"student": cfg.student.model_copy(update={"layers": "first"})}), ws.teacher)
    rows = [inherited_row(first, full_width(ws.teacher.config, 1), "truncated teacher: its first 1 layer(s)",
                          "hand-picked")]
    rows += [inherited_row(ws, StudentArch.from_name(a), f"{a}", "kd-nas") for a in archs]
    distil_rows(ws, rows, work)
    teacher = Row(f"teacher {cfg.teacher.name}", "teacher", "", ws.teacher.model)
    evaluate_rows(ws, [teacher] + [x for r in rows for x in (r, r.floor)], None, work)
    before_file = args.before or args.out / f"headline-{variant}.csv"
    before = pd.read_csv(before_file) if before_file.is_file() else None
    out = []
    for r in rows:
        d = compare(r.eval, teacher.eval, r.floor.eval, cfg.evaluate, cfg.seed)
        old = None
        if before is not None:
            old = before[(before.arch == r.arch) & before.kind.isin(["kd-nas", "hand-picked", "random-search"])]
            old = old.iloc[0] if len(old) else None
        for label, src in ((f"before ({before_file.stem})", old), ("after (this checkout)", d | r.result)):
            if src is None:
                continue
            get = src.get  # a dict (this run) or a pandas row (the headline's csv)
            out.append({"row": r.name, "heads": label, "summary": get("summary"), "summary_se": get("summary_se"),
                        **{t.label: get(f"{t.label}.gap_closed") for t in ws.tasks},
                        "dropin": get("dropin"), "recall@10": get("recall@10")})
        out.append({"row": r.name, "heads": "start KD loss after", "summary": r.result.get("initial_eval_loss")})
    # Its first run listed the L6 rows twice (cause not found); a row is shown once.
    df = pd.DataFrame(out).drop_duplicates()
    path = args.out / f"{args.name or 'init-heads-ab'}.md"
    rel = before_file.relative_to(ROOT) if before_file.is_relative_to(ROOT) else before_file
    md = [*header("Where teacher-initialised students' projection heads start", __file__, argv, cfg), "",
          f"headline-{variant} scale ({len(ws.splits.train)} texts x {cfg.distill.final.epochs} epochs, "
          f"{cfg.teacher.name}, the same recipe, seed and floors); "
          + (f"'before' is {rel}.\n" if before is not None else f"no 'before' rows: {rel} does not exist.\n"),
          markdown_table(df), ""]
    path.write_text("\n".join(md))
    print("\n".join(md))
    return path


# Defaults of the two variants per size: shapes the variant's teacher can be cut into.
VARIANT_DEFAULTS = {
    "full": dict(shapes=["L6-H384-F512-gelu", "L3-H768-F1024-gelu"], heads=[2, 3, 4, 6, 12],
                 archs=["L6-H384-A4-F512-gelu"]),
    "small": dict(shapes=["L3-H384-F768-gelu"], heads=[2, 3, 4, 6, 12], archs=["L3-H384-A6-F768-gelu"]),
    "smoke": dict(shapes=["L2-H64-F128-gelu"], heads=[2, 4], archs=["L1-H64-A4-F128-gelu"]),
}


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    v = p.add_mutually_exclusive_group()
    v.add_argument("--small", action="store_true", help="MiniLM-L6 teacher (configs/default.yaml)")
    add_common_args(p, RESULTS, "tiny random teacher", group=v)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--head-width", action="store_true",
                      help="students cut from the teacher at each head count, scored before distillation")
    mode.add_argument("--init-heads-ab", action="store_true",
                      help="rows distilled again with this checkout's projection-head start, beside --before")
    p.add_argument("--shapes", nargs="+", default=None, help="--head-width: L<layers>-H<hidden>-F<ffn>-<act> shapes")
    p.add_argument("--heads", nargs="+", type=int, default=None, help="--head-width: head counts")
    p.add_argument("--archs", nargs="+", default=None, help="--init-heads-ab: KD-NAS-style rows (uniform layers)")
    p.add_argument("--before", type=Path, default=None,
                   help="--init-heads-ab: the headline csv to compare with (default <out>/headline-<variant>.csv)")
    p.add_argument("--name", default=None, help="the report's file name without suffix "
                   "(default headline-<variant>, head-width or init-heads-ab)")
    for knob in ("train_texts", "final_epochs", "proxy_texts", "episodes", "candidates", "probe_train", "test_texts", "runs"):
        p.add_argument(f"--{knob.replace('_', '-')}", type=int, default=None)
    p.add_argument("--budgets", nargs="+", default=None, help='latency budgets, e.g. 0.1x 0.2x (the first is the target)')
    p.add_argument("--work", type=Path, default=None, help="work folder (default runs/headline-<variant>)")
    p.add_argument("--cache-dir", type=Path, default=None, help="override paths.cache_dir")
    p.add_argument("--no-off-the-shelf", action="store_true", help="skip the MiniLM-L6-as-shipped row")
    p.add_argument("--no-random-init", action="store_true",
                   help="skip the random-init KD-NAS search and its rows (a third of the run's time)")
    add_precision_arg(p, "the searches and every distilled row")
    p.add_argument("--mix", action="store_true", help="distil on the general English mix (WordNet, GCIDE, tweets; "
                   "bench.common.GENERAL_MIX) instead of the config's corpus")
    args = p.parse_args(argv)
    variant = "smoke" if args.smoke else "small" if args.small else "full"
    args.out = out_folder(args.out, args.smoke, RESULTS)
    scale = dict(VARIANTS[variant])
    for k in scale:
        if getattr(args, k, None) is not None:
            scale[k] = getattr(args, k)
    default_work = args.out / "work" if args.smoke else ROOT / "runs" / (
        f"init-heads-ab{'' if variant == 'full' else '-' + variant}" if args.init_heads_ab else f"headline-{variant}")
    work = args.work or default_work
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    cfg = make_config(args, scale, work)
    ws = Workspace.prepare(cfg)
    if args.head_width:
        return head_width(args, cfg, ws, work, variant, argv)
    if args.init_heads_ab:
        return init_heads_ab(args, cfg, ws, work, variant, argv)
    return table_run(args, cfg, ws, work, variant, argv)


def table_run(args, cfg: KDNASConfig, ws: Workspace, work: Path, variant: str, argv: list[str]) -> Path:
    """The headline table."""
    b, s = cfg.latency.reward_shape
    teacher_ms = teacher_latency(ws).median(cfg.latency.reward_backend, b, s)
    phase = {}

    t0 = time.perf_counter()
    kdnas, rnd, kdnas_random, n_distinct, n_new = run_searches(ws, cfg, teacher_ms, not args.no_random_init)
    phase["searches"] = time.perf_counter() - t0
    reused = [] if n_new else ["searches"]
    picks = [r for r in kdnas.recommendations if r.arch]
    if not picks:
        raise SystemExit(f"KD-NAS found no student within any budget: {kdnas.recommendations}")
    target = picks[0]
    seed = cfg.seed

    rows: list[Row] = [Row(f"teacher {cfg.teacher.name}", "teacher", f"{ws.teacher.num_layers}x{ws.teacher.hidden}",
                           ws.teacher.model)]
    if not args.no_off_the_shelf and cfg.teacher.name != "minilm-l6":
        mini = load_teacher(TeacherConfig(name="minilm-l6"), cfg.paths.cache_path())
        shipped = Row("all-MiniLM-L6-v2 as shipped (no distillation by us)", "off-the-shelf", "L6-H384-A12-F1536",
                      mini.model, mini.tokenizer)
        # Its floor follows the rule of every row (its own shape, every weight random), so its gap
        # closed sits beside the students' and the first comparison a user makes can be read.
        rows.append(with_floor(shipped, untrained_floor(mini.model.config, seed)))
    t0 = time.perf_counter()
    for r in hand_picked(ws, target.latency_ms, seed):
        rows.append(r if r.floor else with_floor(r, untrained_floor(r.model.config, seed)))
    phase["hand-picking"] = time.perf_counter() - t0
    if (static := static_row(ws, work)) is not None:
        rows.append(static)
    rbest = next((r for r in rnd.recommendations if r.budget == target.budget and r.arch), None)
    random_note = "random search found nothing within the target budget"
    if rbest and rbest.arch == target.arch:
        random_note = f"random search's best within {target.budget} is the KD-NAS pick itself ({target.arch})"
    elif rbest:
        a = StudentArch.from_name(rbest.arch)
        random_note = ""
        rows.append(inherited_row(ws, a, f"random search best {a.name}", "random-search"))
    int8_of = None
    for rec in picks:
        a = StudentArch.from_name(rec.arch)
        if any(r.kind == "kd-nas" and r.arch == a.name for r in rows):
            next(r for r in rows if r.kind == "kd-nas" and r.arch == a.name).note += f", {rec.budget}"
            continue
        row = inherited_row(ws, a, f"KD-NAS {a.name} (budget {rec.budget})", "kd-nas", f"budget {rec.budget}")
        rows.append(row)
        int8_of = int8_of or row
    for rec in (r for r in (kdnas_random.recommendations if kdnas_random else []) if r.arch):
        a = StudentArch.from_name(rec.arch)
        if (same := next((r for r in rows if r.kind == "kd-nas random init" and r.arch == a.name), None)) is not None:
            same.note += f", {rec.budget}"
            continue
        student = build_student(a, ws.teacher, seed)
        rows.append(with_floor(Row(f"KD-NAS, random init {a.name} (budget {rec.budget})", "kd-nas random init",
                                   a.name, student, distil=True, note=f"budget {rec.budget}"),
                               untrained_floor(student.config, seed)))
    all_rows = [x for r in rows for x in ([r] + [y for y in (r.inherited, r.floor) if y is not None])]

    t0 = time.perf_counter()
    time_rows([r for r in all_rows if r.kind not in ("floor", "inherited")], cfg)
    for r in rows:
        if r.kind == "static":
            time_static(r, ws)
    for r in all_rows:
        if r.kind in ("floor", "inherited"):
            owner = next(o for o in rows if r in (o.floor, o.inherited))
            r.latency = owner.latency  # same architecture, same latency
    phase["latency"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not distil_rows(ws, rows, work):
        reused.append("distillation")
    phase["distillation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_rows(ws, all_rows, int8_of, work)
    phase["evaluation"] = time.perf_counter() - t0

    df = table(all_rows, rows[0], cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"headline-{variant}")
    df.to_csv(f"{stem}.csv", index=False)
    plot(df, Path(f"{stem}.png"))
    # Phases that did their work in an earlier run of this command (resumed): report that run's
    # times for them, and say so.
    timings_file = work / "timings.json"
    earlier = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    times = {k: (earlier.get(k, v) if k in reused else v) for k, v in phase.items()}
    timings_file.write_text(json.dumps(times, indent=2))
    reuse_note = (f" ({' and '.join(reused)} reused from an earlier run of the same command in {work.name}/; "
                  "their times are that run's)") if reused else ""
    md = [
        *header(f"Headline benchmark ({variant}): {cfg.teacher.name} teacher", __file__, argv, cfg),
        f"- latency: ONNX Runtime CPU, {cfg.latency.intra_op_threads} thread, batch {b} x {s} tokens, median of "
        f"{cfg.latency.runs} runs; speed-ups are against the teacher's fp32 latency ({rows[0].latency['ort-fp32'][f'{b}x{s}']:.1f} ms, "
        f"measured in this run).",
        f"- scale: final distillation on {len(ws.splits.train)} train texts x {cfg.distill.final.epochs} epochs "
        f"(batch {cfg.data.batch_size}, {precision_name(cfg.distill.precision, cfg.distill.device)}), same for "
        f"every student row; search {cfg.search.episodes} episodes x "
        f"{cfg.search.candidates_per_episode} candidates for KD-NAS and for random search on {len(ws.splits.proxy)} proxy "
        f"texts ({n_distinct} distinct archs distilled)"
        + (f"; KD-NAS screens {cfg.search.screen} candidates an episode zero-cost by {cfg.search.screen_signal}"
           if cfg.search.screen else "")
        + f"; budgets {', '.join(cfg.reward.budgets)} (target {target.budget}).",
        *[f"- task {t['task']} ({t['kind']}, {PRIMARY[t['kind']]}): {t['size']}" for t in describe_tasks(ws)],
        "- every scored text lies outside what the students were distilled on; gap closed = (row - its untrained "
        "floor) / (teacher - floor) per task, ± paired-bootstrap SE; summary = mean over the tasks ± SE [95 % interval].",
        *[f"- note: {n}" for n in [n for t in ws.tasks for n in t.notes] + ([random_note] if random_note else [])
          + (["no random-init rows (--no-random-init)"] if args.no_random_init else [])],
        f"- time {sum(times.values()) / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + reuse_note,
        "",
        markdown_table(render(df, [t.label for t in ws.tasks])),
        "",
        "## Against the targets",
        "",
        *verdicts(df),
        "",
        "## Against the inherited start",
        "",
        *against_start(df, rows, [t.label for t in ws.tasks]),
        "",
        f"![quality vs latency]({stem.name}.png)",
        "",
    ]
    Path(f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return Path(f"{stem}.md")


if __name__ == "__main__":
    main()
