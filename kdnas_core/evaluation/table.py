"""The downstream table: the teacher, each saved student with its untrained floor, and any other
encoder a user would otherwise pick (a Hugging Face folder, a model2vec static model), all
scored on the same tasks and texts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from kdnas_core.files.atomic import write_text
from kdnas_core.errors import EvalError
from kdnas_core.evaluation.evaluate import ModelEval, compare, evaluate_encoder, evaluate_model
from kdnas_core.progress import Progress
from kdnas_core.search.reports import markdown_table
from kdnas_core.sentence import SentenceEncoder, read_head
from kdnas_core.student import (
    is_student_folder,
    load_sentence_student,
    saved_meta,
    untrained_floor,
)
from kdnas_core.workspace import Workspace


def kind_of(path: Path) -> str:
    """'student' (a kdnas student), 'model2vec' (a static model) or 'transformers' (any other
    Hugging Face encoder folder)."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"{path}: no such folder")
    if is_student_folder(path):
        return "student"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        raise EvalError(f"{path}: not a kdnas student, Hugging Face or model2vec folder (no readable config.json)") from None
    # model2vec writes model_type "model2vec" when it distils; a StaticModel saved by hand writes
    # only its own settings (normalize, embedding_dtype), never a transformers model_type.
    static = config.get("model_type") == "model2vec" or ("model_type" not in config and "normalize" in config)
    return "model2vec" if static else "transformers"


def _static_model(path: Path):
    try:
        from model2vec import StaticModel
    except ImportError:
        raise EvalError(f"{path}: a model2vec model; install the baselines extra: pip install 'kdnas[baselines]'") from None
    try:
        return StaticModel.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - model2vec, safetensors and tokenizers raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"{path}: cannot load as a model2vec model (damaged or incomplete folder?): {first}") from None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model(path: Path) -> str:
    """The kind of the model folder ``path`` (see ``kind_of``), once it is known to load: a
    damaged student, a folder without weights or tokenizer files, or an unreadable model2vec
    model fail here in one line, before the teacher's evaluation costs minutes."""
    from transformers import AutoConfig, AutoTokenizer

    from kdnas_core.student import verify_student
    from kdnas_core.teachers.loading import tokenizer_problem

    path = Path(path)
    kind = kind_of(path)
    if kind == "model2vec":
        _static_model(path)
        return kind
    if kind == "student":
        verify_student(path)
    elif not any((path / f).is_file() for f in WEIGHT_FILES):
        raise EvalError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[::2])}) in this Hugging Face folder")
    try:
        vocab_size = AutoConfig.from_pretrained(str(path)).vocab_size
        tokens = len(AutoTokenizer.from_pretrained(str(path)))
    except Exception as err:  # noqa: BLE001 - transformers and tokenizers raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(f"{path}: cannot load its config or tokenizer: {first}") from None
    if (problem := tokenizer_problem(tokens, vocab_size)) is not None:
        raise EvalError(f"{path}: {problem}")
    return kind


def evaluate_static(ws: Workspace, path: Path) -> tuple[ModelEval, ModelEval]:
    """A model2vec model and its floor: the same vocabulary and width with random vectors."""
    from model2vec import StaticModel

    model = _static_model(path)
    rng = np.random.default_rng(ws.cfg.seed)
    random_model = StaticModel(rng.normal(size=model.embedding.shape).astype(np.float32), model.tokenizer,
                               normalize=model.normalize)
    e = ws.cfg.evaluate

    def run(m: StaticModel, name: str) -> ModelEval:
        return evaluate_encoder(lambda texts: np.asarray(m.encode(list(texts)), dtype=np.float32), name, ws.tasks,
                                ws.fidelity_texts, e, ws.cfg.seed, int(np.prod(m.embedding.shape)))

    return run(model, path.name), run(random_model, f"{path.name} untrained")


def _evaluate_transformers(ws: Workspace, path: Path, progress: Progress) -> tuple[ModelEval, ModelEval]:
    """Any Hugging Face encoder with its own tokenizer, and its floor: the same architecture with
    random weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModel.from_pretrained(str(path)).eval()
        head = read_head(path)  # its own pooling and normalisation when it is a sentence-embedding model
    except (OSError, ValueError) as err:
        raise EvalError(f"{path}: cannot load as a Hugging Face encoder: {str(err).splitlines()[0]}") from None
    floor = untrained_floor(AutoConfig.from_pretrained(str(path)), ws.cfg.seed)
    e = ws.cfg.evaluate
    max_length = min(e.max_length or ws.cfg.data.max_length, tokenizer.model_max_length)
    cache = ws.cfg.paths.cache_path() / "embeddings"

    def run(m, name: str) -> ModelEval:
        m = SentenceEncoder(m, head) if head is not None else m
        return evaluate_model(m, tokenizer, name, ws.tasks, ws.fidelity_texts, e, max_length, cache, ws.cfg.seed, progress)

    return run(model, path.name), run(floor, f"{path.name} untrained")


def evaluate_students(ws: Workspace, paths: list[str | Path], progress: Progress = True) -> pd.DataFrame:
    """The teacher, then for each path: a kdnas student (with its "inherited, not distilled"
    start when it was cut from the teacher) or a baseline, each followed by its floor."""
    kinds = [check_model(p) for p in paths]  # every folder, before the teacher's minutes
    teacher = ws.teacher_evaluation(progress)
    e, seed = ws.cfg.evaluate, ws.cfg.seed
    rows = [{"role": "teacher", "arch": None, "arch_id": None, **compare(teacher, teacher, None, e, seed, progress)}]
    for p, kind in zip(map(Path, paths), kinds):
        if kind == "student":
            model, arch = load_sentence_student(p)
            ident = {"arch": arch.name, "arch_id": arch.arch_id}
            meta = saved_meta(p)
            tokenizer = None
            if meta.get("vocab"):  # trimmed to its corpus: its own tokenizer makes its ids
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(p))
            # The floor is the student's own architecture with every weight random whatever its
            # init, so knowledge copied from the teacher counts as transferred, as distilled
            # knowledge does, and the floor is built as every baseline's is.
            floor = ws.evaluate(untrained_floor(model.config, seed), f"{arch.name} untrained", progress, tokenizer)
            scored = ws.evaluate(model, arch.name, progress, tokenizer)
            rows.append({"role": "student", **ident, **compare(scored, teacher, floor, e, seed, progress)})
            if meta.get("init") == "teacher":  # what inheritance alone gave, before distillation
                inherited = ws.evaluate(ws.build_student(arch), f"{arch.name} inherited, not distilled", progress)
                rows.append({"role": "inherited", **ident, **compare(inherited, teacher, floor, e, seed, progress)})
        else:
            ident = {"arch": f"{kind}:{p.name}", "arch_id": None}
            model_eval, floor = evaluate_static(ws, p) if kind == "model2vec" else _evaluate_transformers(ws, p, progress)
            rows.append({"role": "baseline", **ident, **compare(model_eval, teacher, floor, e, seed, progress)})
        rows.append({"role": "floor", **ident, **compare(floor, teacher, None, e, seed, progress)})
    table = pd.DataFrame(rows)
    table.attrs["tasks"] = describe_tasks(ws)
    return table


def describe_tasks(ws: Workspace) -> list[dict]:
    out = []
    for t in ws.tasks:
        size = {"classification": lambda: f"{len(t.train_texts)} probe-train / {len(t.test_texts)} test texts, "
                                          f"{len(t.classes)} classes",
                "retrieval": lambda: f"{len(t.queries)} queries, each against all {len(t.positives)} positives",
                "similarity": lambda: f"{len(t.text1)} graded pairs",
                "clustering": lambda: f"{len(t.docs)} texts, {len(t.classes)} labels"}[t.kind]()
        out.append({"task": t.label, "kind": t.kind, "size": size, "notes": list(t.notes)})
    return out


PRIMARY = {"classification": "accuracy", "retrieval": "mrr", "similarity": "spearman", "clustering": "v_measure"}


def shown_columns(table: pd.DataFrame) -> list[str]:
    """The columns of evaluation.md: per task its primary score and gap closed, the summary,
    drop-in retrieval (where the model embeds at the teacher's width), fidelity."""
    cols = ["role", "model", "params_m"]
    for t in table.attrs.get("tasks", []):
        label = t["task"]
        cols += [f"{label}.{PRIMARY[t['kind']]}", f"{label}.gap_closed", f"{label}.gap_closed_se"]
    cols += ["summary", "summary_se", "summary_pct_teacher", "dropin", "recall@10", "cka", "cosine"]
    return [c for c in cols if c in table.columns]


def below_inherited(table: pd.DataFrame) -> dict[str, list[str]]:
    """Per distilled student cut from the teacher, the tasks on which it scores below its own
    inherited, undistilled start by more than their combined standard error: where distillation
    took away what the student inherited."""
    tasks = [t["task"] for t in table.attrs.get("tasks", [])]
    rows = {(r["role"], r["arch"]): r for r in table.to_dict("records")}
    out: dict[str, list[str]] = {}
    for (role, arch), r in rows.items():
        start = rows.get(("inherited", arch))
        if role != "student" or start is None:
            continue
        worse = []
        for t in tasks:
            a, b = r.get(f"{t}.gap_closed"), start.get(f"{t}.gap_closed")
            se = np.hypot(r.get(f"{t}.gap_closed_se") or 0.0, start.get(f"{t}.gap_closed_se") or 0.0)
            if a is not None and b is not None and np.isfinite(a) and np.isfinite(b) and a < b - se:
                worse.append(f"{t} ({a:.3f} vs {b:.3f} inherited)")
        out[arch] = worse
    return out


def summary_lines(table: pd.DataFrame) -> list[str]:
    """One line per student or baseline: its summary ± standard error, what the terminal shows;
    under a student that distillation left below its inherited start on some task, which."""
    n = len(table.attrs.get("tasks", []))
    rows = table[table.role.isin(["student", "inherited", "baseline"])].copy()
    for c in ("summary", "summary_se", "summary_pct_teacher", "dropin"):  # rows that went through JSON hold None
        rows[c] = pd.to_numeric(rows[c], errors="coerce") if c in rows.columns else np.nan
    out, worse = [], below_inherited(table)
    for r in rows.itertuples():
        what = f"{r.model} ({r.role})" if r.role != "student" else r.model
        if np.isfinite(r.summary):
            out.append(f"{what}: summary gap closed {r.summary:.3f} ± {r.summary_se:.3f} over {n} task(s), "
                       f"{100 * r.summary_pct_teacher:.1f} % of the teacher"
                       + (f"; drop-in retrieval {100 * r.dropin:.1f} % of the teacher's recall@10"
                          if np.isfinite(r.dropin) else ""))
        else:
            out.append(f"{what}: summary undefined (the teacher does no better than the untrained floor)")
        if r.role == "student" and worse.get(r.arch):
            out.append(f"  below its inherited start on: {', '.join(worse[r.arch])}")
    return out


def write_evaluation(table: pd.DataFrame, out: Path) -> dict:
    """``evaluation.csv`` and ``evaluation.md`` next to a search's other tables."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "evaluation.csv", table.to_csv(index=False))
    write_text(out / "evaluation.md", evaluation_markdown(table))
    return {"csv": str(out / "evaluation.csv"), "md": str(out / "evaluation.md")}


def evaluation_markdown(table: pd.DataFrame) -> str:
    """The table as evaluation.md holds it: what the columns mean, the tasks, the rows."""
    tasks = table.attrs.get("tasks", [])
    md = ["# Downstream evaluation\n",
          "Gap closed = (model - untrained floor) / (teacher - floor) on each task's primary score, ± paired "
          "bootstrap standard error; summary = mean gap closed over the tasks ± its standard error. Fidelity on "
          "held-out corpus texts: teacher-neighbour recall@10, linear CKA, cosine to the teacher's embedding after "
          "a fitted linear map. Drop-in = recall@10 with the teacher's embeddings of the positives (an index the "
          "teacher built) queried by the model, as a share of the teacher's own recall@10 (teacher-width models only).\n",
          "| task | kind | primary score | data |", "|---|---|---|---|",
          *[f"| {t['task']} | {t['kind']} | {PRIMARY[t['kind']]} | {t['size']} |" for t in tasks], "",
          *[f"- note ({t['task']}): {n}" for t in tasks for n in t["notes"]], "",
          markdown_table(table[shown_columns(table)]), ""]
    return "\n".join(md)
