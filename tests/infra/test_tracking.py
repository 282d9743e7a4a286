"""MLflow tracking on the embedded default (local SQLite store, local artifact folder)."""

import json
from pathlib import Path

import pytest
import torch

from kdnas_core.config import LatencyConfig, config_from_dict
from kdnas_core.final import export_student
from kdnas_core.search.space import StudentArch
from kdnas_core.student import build_student, save_student


@pytest.fixture()
def tracker(tmp_path, monkeypatch):
    from infra.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-never-logged-123")
    cfg = config_from_dict({"paths": {"output_dir": str(tmp_path / "runs")}, "teacher": {"name": "minilm-l6"}})
    return Tracker(cfg)


def _obs(arch: StudentArch) -> dict:
    return {"arch": arch.name, "arch_id": arch.arch_id, "arch_dict": arch.to_dict(), "reward": 0.25, "kd_loss": 0.7,
            "latency_ms": 12.5, "episode": 1, "params_m": 3.2, "flops_g": 0.4, "quality": 0.35,
            "extra": {"pooled_cosine": 0.3, "note": "x", "signals": {"recall10": 0.65, "translation_r1": None}}}


def test_parent_and_child_runs_with_params_metrics_and_artifacts(tracker, tmp_path):
    assert tracker.uri.startswith("sqlite:///") and str(tmp_path) in tracker.uri
    parent = tracker.start_search("abc123", 37.1, {"splits_fingerprint": "f00"})
    arch = StudentArch(2, 64, 4, 128)
    report = {"hardware": "cpu", "results": {"ort-fp32": {"1x128": {"median_ms": 12.5, "p90_ms": 13.0, "cv": 0.05}}}}
    child = tracker.log_candidate(parent, _obs(arch), report, [1.0, 0.9, 0.8])
    c = tracker.client
    p = c.get_run(parent)
    assert p.data.params["distill.lr"] == "0.0005" and p.data.params["data.splits_fingerprint"] == "f00"
    assert p.data.metrics["teacher_latency_ms"] == 37.1
    r = c.get_run(child)
    assert r.info.run_name == arch.arch_id and r.data.tags["mlflow.parentRunId"] == parent
    assert r.data.params["hidden"] == "64" and r.data.params["activation"] == "gelu"
    assert r.data.metrics["reward"] == 0.25 and r.data.metrics["latency.ort-fp32.1x128.p90_ms"] == 13.0
    # The reward's quality term and the proxy run's quality signals, chartable in the UI.
    assert r.data.metrics["quality"] == 0.35 and r.data.metrics["signal.recall10"] == 0.65
    assert "signal.translation_r1" not in r.data.metrics
    assert [m.value for m in c.get_metric_history(child, "proxy_kd_loss")] == [1.0, 0.9, 0.8]
    assert {a.path for a in c.list_artifacts(child)} == {"arch.json", "latency.json"}
    children = c.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert [x.info.run_id for x in children] == [child]


def test_registered_student_loads_back_with_the_same_outputs(tracker, tmp_path, bert_teacher, tokenizer):
    import mlflow
    from transformers import AutoModel

    arch = StudentArch(2, 32, 4, 64)
    student = build_student(arch, bert_teacher).eval()
    folder = save_student(student, tokenizer, arch, tmp_path / "student")
    export_student(folder, LatencyConfig())  # a final student is registered once exported
    parent = tracker.start_search("abc123", 10.0, {})
    reg = tracker.register_student(parent, folder, ["0.25x", "50ms"], {"final_eval_loss": 0.5})
    assert reg["aliases"] == ["budget-0_25x", "budget-50ms"]
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{reg['model']}@budget-50ms", dst_path=str(tmp_path / "dl"))
    local = Path(model_dir) / "artifacts" / "student"  # inside the MLflow model (tests/infra/test_mlflow_model.py)
    loaded = AutoModel.from_pretrained(local).eval()
    enc = tokenizer(["registered students come back unchanged"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).last_hidden_state, student(**enc).last_hidden_state)
    assert json.loads((Path(local) / "kdnas_arch.json").read_text())["arch_id"] == arch.arch_id
    # a rerun of the search (after an outage) registers nothing twice
    again = tracker.register_student(parent, folder, ["0.25x", "50ms"], {"final_eval_loss": 0.5})
    assert again == reg
    assert len(tracker.client.search_model_versions(f"name = '{reg['model']}'")) == 1


def test_credentials_never_reach_params_tags_or_metrics(tracker):
    parent = tracker.start_search("abc123", 10.0, {})
    tracker.log_candidate(parent, _obs(StudentArch(2, 64, 4, 128)), None, None)
    for run in tracker.client.search_runs([tracker.experiment_id]):
        text = json.dumps({"p": run.data.params, "t": run.data.tags, "m": run.data.metrics})
        assert "fake-secret-never-logged-123" not in text


def test_experiment_opens_in_the_ui_on_the_candidates(tracker, tmp_path):
    """The experiment is tagged as model training and holds a saved view of the candidate runs
    (reward, KD loss, latency, size as columns and charts); the parent run links to it."""
    from infra.tracking import Tracker

    c = tracker.client
    tags = c.get_experiment(tracker.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.kdnas-candidates"])
    state = json.loads(view["state"])
    assert view["name"] == "kdnas candidates" and isinstance(view["createdAt"], int)
    assert state["selectedColumns"][:4] == ["metrics.`reward`", "metrics.`kd_loss`", "metrics.`latency_ms`",
                                            "metrics.`params_m`"]
    assert state["orderByKey"] == "metrics.`reward`" and state["orderByAsc"] is False
    url = tracker.candidates_url()
    assert url.endswith(f"/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
                        "&viewStateShareKey=kdnas-candidates")

    parent = tracker.start_search("abc123", 10.0, {})
    child = tracker.log_candidate(parent, _obs(StudentArch(2, 64, 4, 128)), None, None)
    assert url.split("/", 3)[3] in c.get_run(parent).data.tags["mlflow.note.content"]
    run = c.get_run(child)
    assert run.data.metrics["params_m"] == 3.2 and run.data.params["params_m"] == "3.2000"  # chartable, and as before
    # The view's filter is MLflow search syntax that finds exactly the candidate runs.
    assert [r.info.run_id for r in c.search_runs([tracker.experiment_id], state["searchFilter"])] == [child]

    # An experiment kdnas did not create keeps the kind its owner chose; only what it lacks is added.
    cfg = config_from_dict({"paths": {"output_dir": str(tmp_path / "runs")}, "teacher": {"name": "minilm-l6"},
                            "tracking": {"experiment": "someone-elses"}})
    exp = c.create_experiment("someone-elses", tags={"mlflow.experimentKind": "genai_development"})
    Tracker(cfg)
    tags = c.get_experiment(exp).tags
    assert tags["mlflow.experimentKind"] == "genai_development" and "mlflow.sharedViewState.kdnas-candidates" in tags
