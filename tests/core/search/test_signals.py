"""Quality signals of candidates: zero-cost (the student as cut from the teacher) and after the
proxy distillation, on a tiny random teacher and real tweets."""

import pytest
import torch

from kdnas_core.config import load_config
from kdnas_core.errors import KdnasError
from kdnas_core.search.candidates import ProxyEvaluator
from kdnas_core.search.signals import SignalProbe, Signals
from kdnas_core.search.space import StudentArch
from kdnas_core.workspace import Workspace

# The tiny teacher is L4-H64-A4-F256; the space is widened so that it contains the teacher itself.
OVERRIDES = {"search_space.layers": [1, 2, 4], "search_space.ffn": [64, 256]}


@pytest.fixture()
def ws(tiny_config):
    return Workspace.prepare(load_config(tiny_config, OVERRIDES))


def test_zero_cost_screen_ranks_a_pool_without_training(ws):
    probe = SignalProbe(ws)
    before = [p.detach().clone() for p in ws.teacher.model.parameters()]
    pool = ["L4-H64-A4-F256-gelu", "L2-H64-A4-F256-gelu", "L1-H32-A2-F64-gelu"]
    got = {name: probe.zero_cost(StudentArch.from_name(name)) for name in pool}

    whole = got["L4-H64-A4-F256-gelu"]  # every teacher layer and dimension kept: the teacher itself
    assert whole.recall10 == pytest.approx(1.0) and whole.cka == pytest.approx(1.0, abs=1e-4)
    assert whole.hidden == pytest.approx(0.0, abs=1e-3)
    smallest = got["L1-H32-A2-F64-gelu"]
    assert smallest.recall10 < whole.recall10 and smallest.hidden > whole.hidden + 0.05
    # Ranked by any zero-cost signal, the teacher itself comes first and the smallest cut last.
    assert whole.hidden_last == pytest.approx(0.0, abs=1e-3) and smallest.hidden_last > whole.hidden_last + 0.05
    for name in ("recall10", "hidden", "hidden_last"):
        ranked = sorted(pool, key=lambda a: got[a].quality(name))
        assert ranked[0] == "L4-H64-A4-F256-gelu" and ranked[-1] == "L1-H32-A2-F64-gelu", (name, got)
    # Forward passes only: the teacher is untouched and nothing was trained.
    assert all(torch.equal(a, b) for a, b in zip(before, ws.teacher.model.parameters()))
    assert all(s.seconds >= 0 for s in got.values())


def test_every_proxy_run_records_the_trained_students_signals_and_quality_picks_one(ws):
    res = ProxyEvaluator(ws, progress=False).distill(StudentArch.from_name("L1-H32-A2-F64-gelu"))
    s = res.signals
    assert 0.0 <= s["recall10"] <= 1.0 and 0.0 <= s["hidden"] <= 1.0 and s["seconds"] < res.distill_s + 60
    assert s["hidden"] == pytest.approx(res.kd_loss)  # the same held-out texts as the search's L_HS
    assert s["translation_r1"] is None  # tweets: no translation pairs
    # reward.quality: the evaluation's quality term is the named signal; L_HS stays reported.
    assert res.evaluation(5.0).quality is None and res.evaluation(5.0).quality_loss == res.kd_loss
    assert res.evaluation(5.0, "recall10").quality == pytest.approx(1 - s["recall10"])
    # One layer: its last state is its only transformer state, so both hidden-state signals agree.
    assert s["hidden_last"] == pytest.approx(s["hidden"]) and res.evaluation(5.0, "hidden_last").quality == \
        pytest.approx(s["hidden_last"])
    with pytest.raises(KdnasError, match="translation pairs"):
        res.evaluation(5.0, "translation_r1")


def test_a_signal_that_needs_pairs_on_a_corpus_without_them_is_one_line():
    s = Signals(hidden=0.3, cosine=0.1, recall10=0.6, cka=0.8, translation_r1=None)
    assert s.quality("hidden") == pytest.approx(0.3)
    assert s.quality("recall10") == pytest.approx(0.4)  # as a loss: 1 - recall
    with pytest.raises(KdnasError) as err:
        s.quality("translation_r1")
    assert "\n" not in str(err.value) and "translation pairs" in str(err.value)
    with pytest.raises(KdnasError, match="expected one of"):
        s.quality("seconds")
