"""The downstream table of saved students: teacher, each student and its untrained floor."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kdnas_core.atomic import write_text
from kdnas_core.evaluate import compare
from kdnas_core.reports import markdown_table
from kdnas_core.student import build_student, load_student, saved_meta
from kdnas_core.workspace import Workspace


def evaluate_students(ws: Workspace, student_dirs: list[str | Path], progress: bool = True) -> pd.DataFrame:
    """Downstream table of saved students: the teacher, then each student and its untrained
    floor (same architecture and initialisation as its distillation started from)."""
    teacher = ws.teacher_eval
    e = ws.cfg.evaluate
    rows = [{"role": "teacher", "arch": None, "arch_id": None, **compare(teacher, teacher, None, e, ws.cfg.seed)}]
    for d in student_dirs:
        model, arch = load_student(Path(d))
        # The floor is the same architecture random and untrained whatever the student's init,
        # so knowledge copied from the teacher counts as transferred, as distilled knowledge does.
        floor = ws.evaluate(build_student(arch, ws.teacher, seed=ws.cfg.seed), f"{arch.name} untrained", progress)
        student = ws.evaluate(model, arch.name, progress)
        row = {"arch": arch.name, "arch_id": arch.arch_id}
        rows.append({"role": "student", **row, **compare(student, teacher, floor, e, ws.cfg.seed)})
        if saved_meta(Path(d)).get("init") == "teacher":  # what inheritance alone gave, before distillation
            inherited = ws.evaluate(ws.build_student(arch), f"{arch.name} inherited, not distilled", progress)
            rows.append({"role": "inherited", **row, **compare(inherited, teacher, floor, e, ws.cfg.seed)})
        rows.append({"role": "floor", **row, **compare(floor, teacher, None, e, ws.cfg.seed)})
    table = pd.DataFrame(rows)
    table.attrs["task"] = {"test_texts": len(ws.task.test_texts), "train_texts": len(ws.task.train_texts),
                           "classes": ws.task.classes, "notes": ws.task.notes}
    return table


EVAL_COLUMNS = ["model", "params_m", "probe_acc", "probe_f1", "pct_teacher_acc", "gap_closed_acc",
                "gap_closed_acc_se", "gap_closed_f1", "recall@10", "cka"]


def write_evaluation(table: pd.DataFrame, out: Path) -> dict:
    """``evaluation.csv`` and ``evaluation.md`` next to a search's other tables."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "evaluation.csv", table.to_csv(index=False))
    task = table.attrs.get("task", {})
    cols = [c for c in EVAL_COLUMNS if c in table.columns]
    md = ["# Downstream evaluation\n",
          f"Linear probe on mean-pooled embeddings, {task.get('train_texts')} train / {task.get('test_texts')} held-out "
          f"texts, classes {task.get('classes')}. Gap closed = (student - untrained floor) / (teacher - floor), "
          "± bootstrap standard error.\n", *[f"- note: {n}" for n in task.get("notes", [])], "",
          markdown_table(table[cols]), ""]
    write_text(out / "evaluation.md", "\n".join(md))
    return {"csv": str(out / "evaluation.csv"), "md": str(out / "evaluation.md")}
