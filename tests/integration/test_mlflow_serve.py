"""``mlflow models serve`` serves a registered student by its alias: texts in over HTTP, the
embeddings of its ONNX file out."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.integration.support import free_port

pytestmark = pytest.mark.integration

TEXTS = ["hello", "world", "a registered student answers over http"]


def _post(url: str, body: dict) -> list:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["predictions"]


def _refused(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    return err.value.code, json.loads(err.value.read())


def test_mlflow_models_serve_answers_with_the_students_embeddings(registered_student, onnx_reference, tmp_path):
    port = free_port()
    bin_dir = Path(sys.executable).parent
    # the same store the student was registered in (the server resolves the alias itself); the
    # CLI starts `uvicorn` by name, so the venv's bin goes first on PATH, as when it is activated
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered_student["tracker"].uri,
           "MLFLOW_REGISTRY_URI": registered_student["tracker"].uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = bin_dir / "mlflow"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", registered_student["uri"], "--env-manager",
                                 "local", "-h", "127.0.0.1", "-p", str(port)], env=env, cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlflow models serve exited {proc.returncode}: {log_path.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, f"no /ping answer in 120 s: {log_path.read_text()[-2000:]}"
            time.sleep(1)
        want = onnx_reference(registered_student["student"], TEXTS)
        url = f"http://127.0.0.1:{port}/invocations"
        split = _post(url, {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}})
        np.testing.assert_allclose(np.array(split, dtype=np.float32), want, atol=1e-5)
        inputs = _post(url, {"inputs": TEXTS})
        np.testing.assert_allclose(np.array(inputs, dtype=np.float32), want, atol=1e-5)
        # the "text" column, wherever it is and whatever else is sent with it
        ids = [str(i) for i in range(len(TEXTS))]
        rows = [[i, t] for i, t in zip(ids, TEXTS)]
        with_ids = _post(url, {"dataframe_split": {"columns": ["id", "text"], "data": rows}})
        np.testing.assert_allclose(np.array(with_ids, dtype=np.float32), want, atol=1e-5)
        with_ids = _post(url, {"inputs": {"id": ids, "text": TEXTS}})
        np.testing.assert_allclose(np.array(with_ids, dtype=np.float32), want, atol=1e-5)
        np.testing.assert_allclose(np.array(_post(url, {"inputs": TEXTS[0]}), dtype=np.float32), want[:1], atol=1e-5)
        assert _post(url, {"inputs": []}) == []
        # MLflow puts "Failed to predict data '<the input>'." before the model's own one line
        for body, line in [({"inputs": [1, None]}, "text 0 is int 1, expected a string"),
                           ({"dataframe_split": {"columns": ["text"], "data": [["hello"], [None]]}},
                            "text 1 is float nan, expected a string"),
                           ({"dataframe_split": {"columns": ["id", "sentence"], "data": [["1", "hello"]]}},
                            "expected a 'text' column (or a single column), got columns ['id', 'sentence']"),
                           ({"inputs": ["hello", "cut \ud83d"]},
                            "text 1 is not valid Unicode: '\\ud83d' at character 4 (a lone surrogate)")]:
            status, answer = _refused(url, body)
            assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", (body, answer)
            assert answer["message"].endswith(f"\nError: {line}"), (body, answer["message"])
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """The server and its uvicorn workers (its own process group), whatever state it is in: asked
    to stop, then whatever is left of the group killed."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            break
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    proc.wait(timeout=30)
