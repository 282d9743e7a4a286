import json

import pytest
import torch
from transformers import AutoModel

from kdnas_core.errors import ArchError
from kdnas_core.search.space import StudentArch
from kdnas_core.student import ARCH_FILE, build_student, count_parameters, load_student, save_student


def test_student_has_the_arch_and_the_teachers_vocab(any_teacher):
    arch = StudentArch(2, 32, 2, 64, "relu")
    s = build_student(arch, any_teacher)
    c = s.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act) == (2, 32, 2, 64, "relu")
    assert c.vocab_size == any_teacher.config.vocab_size
    assert c.pad_token_id == any_teacher.tokenizer.pad_token_id


def test_saved_student_loads_with_automodel_as_safetensors(bert_teacher, tokenizer, tmp_path):
    arch = StudentArch(2, 32, 4, 64)
    s = build_student(arch, bert_teacher, seed=0).eval()
    out = save_student(s, tokenizer, arch, tmp_path / "student", {"teacher": "tiny-bert"})
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert json.loads((out / ARCH_FILE).read_text())["arch_id"] == arch.arch_id
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary folders left
    enc = tokenizer(["the student speaks"], return_tensors="pt")
    loaded = AutoModel.from_pretrained(out).eval()
    torch.testing.assert_close(loaded(**enc).last_hidden_state, s(**enc).last_hidden_state)
    again, arch2 = load_student(out)
    assert arch2 == arch and count_parameters(again) == count_parameters(s)
    with pytest.raises(ArchError, match="not a kdnas student"):
        load_student(tmp_path)


def test_same_width_student_copies_teacher_embeddings(bert_teacher):
    s = build_student(StudentArch(2, 64, 4, 128), bert_teacher)
    torch.testing.assert_close(s.embeddings.word_embeddings.weight, bert_teacher.model.embeddings.word_embeddings.weight)


def test_narrow_student_embeddings_keep_the_teachers_geometry(minilm_teacher):
    """PCA projection: token similarities in the student mirror the teacher's, at BERT's init scale."""
    s = build_student(StudentArch(3, 128, 4, 512), minilm_teacher)
    w_s = s.embeddings.word_embeddings.weight.detach()
    w_t = minilm_teacher.model.embeddings.word_embeddings.weight
    assert abs(float(w_s.std()) - 0.02) < 0.002
    idx = torch.randint(1000, 30000, (400,), generator=torch.Generator().manual_seed(0))
    cos = lambda w: torch.nn.functional.normalize(w[idx] - w.mean(0), dim=1) @ torch.nn.functional.normalize(w[idx] - w.mean(0), dim=1).T  # noqa: E731
    tri = torch.triu_indices(400, 400, 1)
    a, b = cos(w_s)[tri[0], tri[1]], cos(w_t.float())[tri[0], tri[1]]
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.7
    random_init = build_student(StudentArch(3, 128, 4, 512), minilm_teacher, init_from_teacher=False)
    r = cos(random_init.embeddings.word_embeddings.weight.detach())[tri[0], tri[1]]
    assert torch.corrcoef(torch.stack([r, b]))[0, 1] < 0.2


def test_saving_never_deletes_a_folder_kdnas_did_not_create(bert_teacher, tmp_path):
    from kdnas_core.errors import ArchError
    from kdnas_core.search.space import StudentArch
    from kdnas_core.student import build_student, load_student, save_student

    arch = StudentArch(1, 32, 2, 64)
    user = tmp_path / "precious"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ArchError, match="precious: folder exists and is not a kdnas student"):
        save_student(build_student(arch, bert_teacher), bert_teacher.tokenizer, arch, user)
    assert (user / "notes.txt").read_text() == "mine" and (user / "sub").is_dir()
    # a student kdnas saved is replaced, and the replacement is verified on load
    path = save_student(build_student(arch, bert_teacher, seed=1), bert_teacher.tokenizer, arch, tmp_path / "s")
    save_student(build_student(arch, bert_teacher, seed=2), bert_teacher.tokenizer, arch, path)
    load_student(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "s"]
