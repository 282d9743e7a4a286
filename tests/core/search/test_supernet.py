"""The teacher trained as a weight-shared super-network: its cuts are exactly the inherited
students, training moves the shared weights and lowers the students' held-out KD loss, on a tiny
random teacher and real tweets."""

import random

import pytest
import torch
from torch.func import functional_call

from kdnas_core.config import load_config
from kdnas_core.errors import KdnasError
from kdnas_core.inherit import build_inherited, cut_values, empty_student
from kdnas_core.search.space import StudentArch
from kdnas_core.search.supernet import SuperNet
from kdnas_core.workspace import Workspace

OVERRIDES = {"search_space.layers": [1, 2, 4], "search_space.ffn": [64, 256], "search_space.activation": ["gelu"]}


@pytest.fixture()
def ws(tiny_config):
    return Workspace.prepare(load_config(tiny_config, OVERRIDES))


def test_a_functional_cut_of_the_teacher_is_the_inherited_student(ws):
    teacher, texts = ws.teacher.model.eval(), ws.batches("eval")[0]
    for name in ("L2-H32-A2-F64-gelu", "L4-H64-A4-F256-gelu", "L1-H64-A2-F256-gelu"):
        arch = StudentArch.from_name(name)
        sel = ws.selection(arch)
        real = build_inherited(teacher, arch, sel).eval()
        shell = empty_student(teacher, arch, sel)
        kwargs = {"input_ids": texts.input_ids, "attention_mask": texts.attention_mask}
        with torch.no_grad():
            want = real(**kwargs).last_hidden_state
            got = functional_call(shell, cut_values(teacher, shell, sel), args=(), kwargs=kwargs).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_the_super_network_lowers_its_students_held_out_loss(ws):
    net = SuperNet(ws)
    archs = [StudentArch.from_name(n) for n in ("L1-H32-A2-F64-gelu", "L2-H64-A4-F64-gelu", "L2-H32-A2-F256-gelu")]
    before = {a.name: net.signals(a) for a in archs}
    embeddings = {n: p.detach().clone() for n, p in net.model.named_parameters() if "embeddings" in n}
    blocks = {n: p.detach().clone() for n, p in net.model.named_parameters() if "embeddings" not in n}
    run = net.train(steps=40, students_per_step=2, lr=1e-3, draw=lambda rng: rng.choice(archs), progress=False)
    after = {a.name: net.signals(a) for a in archs}
    # Every student's held-out KD loss went down, both terms, on texts no step saw (a random tiny
    # teacher's states are hard to fit with fewer dims: the drops are small but steady).
    for a in archs:
        b, f = before[a.name], after[a.name]
        assert f.hidden < b.hidden and f.cosine < b.cosine, (a.name, b, f)
    assert run.steps == 40 and run.students_drawn == 80 and run.distinct_students == 3 and len(run.losses) == 40
    # The shared block weights moved, the embedding tables stayed the teacher's, and the teacher
    # itself was not touched.
    assert all(torch.equal(p, embeddings[n]) for n, p in net.model.named_parameters() if n in embeddings)
    assert any(not torch.equal(p, blocks[n]) for n, p in net.model.named_parameters() if n in blocks)
    assert all(torch.equal(p, blocks[n]) for n, p in ws.teacher.model.named_parameters() if n in blocks)
    # A student cut from it is a plain model of the teacher's class.
    assert type(net.student(archs[0])) is type(ws.teacher.model)


def test_a_super_network_with_attention_relations_is_one_line(tiny_config):
    ws = Workspace.prepare(load_config(tiny_config, {**OVERRIDES, "distill.weights.attention_relation": 1.0}))
    with pytest.raises(KdnasError, match="attention_relation must be 0"):
        SuperNet(ws)
