"""Server mode for tracking: a local S3 endpoint (moto) and an MLflow server whose artifacts go to
S3; a tiny search flow logs to it; runs, S3 objects and the registered student are checked."""

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.integration.support import REPO, free_port

pytestmark = pytest.mark.integration


@pytest.fixture()
def servers(tmp_path, monkeypatch):
    s3_port, mlflow_port = free_port(), free_port()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-xyz", "AWS_DEFAULT_REGION": "us-east-1",
             "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"}
    env = {**os.environ, **creds, "KDNAS_S3_PORT": str(s3_port), "KDNAS_MLFLOW_PORT": str(mlflow_port),
           "KDNAS_BUCKET": "kdnas-it", "KDNAS_MLFLOW_DIR": str(tmp_path / "mlflow"),
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    try:
        subprocess.run(["bash", "infra/s3-server.sh", "start"], cwd=REPO, env=env, check=True, timeout=120)
        subprocess.run(["bash", "infra/mlflow-server.sh", "start"], cwd=REPO, env=env, check=True, timeout=200)
        yield {"uri": f"http://127.0.0.1:{mlflow_port}", "s3": f"http://127.0.0.1:{s3_port}", "bucket": "kdnas-it"}
    finally:
        subprocess.run(["bash", "infra/mlflow-server.sh", "stop"], cwd=REPO, env=env, timeout=60)
        subprocess.run(["bash", "infra/s3-server.sh", "stop"], cwd=REPO, env=env, timeout=60)


def test_search_is_tracked_on_the_server_with_artifacts_in_s3(servers, prefect_harness, tiny_config, tokenizer,
                                                              onnx_reference):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModel

    from flows.search import kdnas
    from infra.storage import list_keys

    out = kdnas(config_path=str(tiny_config), overrides={"tracking.uri": servers["uri"]}, research=False)
    client = MlflowClient(servers["uri"])
    parent = client.get_run(out["tracking_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len([r for r in children if r.data.tags.get("kdnas.status") == "evaluated"]) == out["evaluated"] == 4

    keys = list_keys(servers["bucket"], "mlflow/", servers["s3"])
    assert any(k.endswith("student/model.safetensors") for k in keys), keys[:20]
    assert any(k.endswith("student/model.int8.onnx") for k in keys)
    assert any(k.endswith("search/leaderboard.csv") for k in keys)

    final = next(iter(out["final"].values()))
    reg = final["registered"]
    mlflow.set_tracking_uri(servers["uri"])
    mlflow.set_registry_uri(servers["uri"])
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{reg['model']}@{reg['aliases'][0]}")
    local = Path(model_dir) / "artifacts" / "student"  # the student folder inside the MLflow model
    loaded, saved = AutoModel.from_pretrained(local).eval(), AutoModel.from_pretrained(final["path"]).eval()
    enc = tokenizer(["the registered student, fetched from S3"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).last_hidden_state, saved(**enc).last_hidden_state)
    # the same version as a pyfunc model, fetched from S3 through the server
    texts = ["the registered student, fetched from S3", "as an MLflow model"]
    served = mlflow.pyfunc.load_model(f"models:/{reg['model']}@{reg['aliases'][0]}").predict(texts)
    np.testing.assert_allclose(served, onnx_reference(Path(final["path"]), texts), atol=1e-5)
    for run in [parent, *children]:  # the test credentials never show up in what was logged
        assert "testing-secret-xyz" not in repr((run.data.params, run.data.tags))

    # A person's view: headless Chromium renders the MLflow UI of this server. The experiment
    # page lists the search; the search's run page lists every candidate run by arch_id.
    exp_page = render(f"{servers['uri']}/#/experiments/{parent.info.experiment_id}/runs")
    assert parent.info.run_name in exp_page
    shot = REPO / "runs" / "test-artifacts" / "mlflow-ui.png"
    run_page = render(f"{servers['uri']}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}", shot)
    for child in children:
        if child.data.tags.get("kdnas.status") == "evaluated":
            assert child.info.run_name in run_page
    assert shot.stat().st_size > 10_000

    # The link kdnas prints opens the model-training runs table on the candidates, with reward,
    # KD loss, latency and size as columns, without a user choosing any.
    assert out["tracking_url"].startswith(f"{servers['uri']}/#/experiments/{parent.info.experiment_id}/runs?")
    shot = REPO / "runs" / "test-artifacts" / "mlflow-runs-table.png"
    table = render(out["tracking_url"], shot)
    assert "kdnas candidates" in table and "Evaluation runs" not in table  # the GenAI pages' side menu
    for column in ("reward", "kd_loss", "latency_ms", "params_m"):
        assert f">{column}<" in table, column
    for child in children:
        if child.data.tags.get("kdnas.status") == "evaluated":
            m = child.data.metrics
            assert child.info.run_name in table and child.data.params["arch"] in table
            for key in ("reward", "kd_loss", "latency_ms", "params_m"):
                assert js_number(m[key]) in table, (child.info.run_name, key, m[key])
    assert parent.info.run_name not in table  # candidates only, not folded under their search
    # Its chart view: one chart for each of those four numbers, none for the other metrics.
    charts = render(f"{out['tracking_url']}&compareRunsMode=CHART", REPO / "runs" / "test-artifacts" / "mlflow-runs-charts.png")
    assert re.search(r"Model metrics(<[^>]+>|\s)*\(4\)", charts)

    # The registered model's page lists its versions with one alias per latency budget.
    shot = REPO / "runs" / "test-artifacts" / "mlflow-registered-model.png"
    model_page = render(f"{servers['uri']}/#/models/{reg['model']}?workflowType=machine_learning", shot)
    assert reg["model"] in model_page
    for alias in (a for f in out["final"].values() for a in f["registered"]["aliases"]):
        assert alias in model_page, alias


def js_number(value: float) -> str:
    """A number as the MLflow UI (JavaScript) writes it: 12.5, 3, 0.30000000000000004."""
    return repr(value).removesuffix(".0")


def render(url: str, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (and optionally a screenshot), headless Chromium."""
    import shutil
    import tempfile

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed: apt-get install chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=20000", "--window-size=1920,1080"]  # every column of the runs table
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, *flags, f"--user-data-dir={profile}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=120).stdout
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([chromium, *flags, f"--user-data-dir={profile}", f"--screenshot={screenshot}", url],
                           capture_output=True, timeout=120, check=True)
    return dom
