"""A registered student is an MLflow pyfunc model: ``mlflow.pyfunc.load_model`` on its alias
gives the embeddings of its exported ONNX file, from a list, a Series or a DataFrame."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TEXTS = ["the cat sat on the mat", "ok", "stocks fell sharply on tuesday after the announcement",
         # longer than the tiny student's 24 tokens: cut the way kdnas cuts it
         " ".join(["a sentence that goes on"] * 20), "", "émigrés café naïve"]


def test_the_registered_student_embeds_as_its_onnx_file(registered_student, onnx_reference):
    import mlflow

    model = mlflow.pyfunc.load_model(registered_student["uri"])
    want = onnx_reference(registered_student["student"], TEXTS)
    for given in (TEXTS, pd.Series(TEXTS), pd.DataFrame({"text": TEXTS}), pd.DataFrame({"sentence": TEXTS})):
        got = model.predict(given)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
    # more texts than one internal batch, in the caller's order
    many = [f"text number {i} " + "word " * (i % 7) for i in range(150)]
    np.testing.assert_allclose(model.predict(many), onnx_reference(registered_student["student"], many), atol=1e-5)


def test_a_dataframe_gives_its_text_column_and_no_texts_give_no_rows(registered_student):
    """MLflow enforces a signature's input schema before the model sees the input: an unnamed
    string column handed over only the first column, so a DataFrame of ids and texts embedded
    the ids, and an empty list failed the column count."""
    import mlflow

    model = mlflow.pyfunc.load_model(registered_student["uri"])
    texts, ids = model.predict(["a cat", "a dog"]), model.predict(["17", "42"])
    for given in (pd.DataFrame({"id": ["17", "42"], "text": ["a cat", "a dog"]}),
                  pd.DataFrame({"text": ["a cat", "a dog"], "id": ["17", "42"]}),
                  {"id": ["17", "42"], "text": ["a cat", "a dog"]}):
        got = model.predict(given)
        np.testing.assert_allclose(got, texts, atol=1e-6)
        assert not np.allclose(got, ids, atol=1e-3)
    np.testing.assert_allclose(model.predict(np.array("a cat")), texts[:1], atol=1e-6)  # {"inputs": "a cat"}
    for empty in ([], pd.Series([], dtype=object), pd.DataFrame({"id": [], "text": []}), np.array([], dtype=str)):
        got = model.predict(empty)
        assert got.dtype == np.float32 and got.shape == (0, 32)


def test_inputs_that_are_not_texts_are_refused_in_one_line(registered_student):
    """Over HTTP these are a 400 whose message ends with the line (tests/integration/test_mlflow_serve.py)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(registered_student["uri"])
    cases = [
        ([1, None], r"text 0 is int 1, expected a string"),
        (["a cat", None], r"text 1 is NoneType None, expected a string"),
        (pd.DataFrame({"id": ["17"], "text": [float("nan")]}), r"text 0 is float nan, expected a string"),
        (pd.DataFrame({"id": ["17", "42"], "text": ["a cat", np.nan]}), r"text 1 is float nan, expected a string"),
        (pd.DataFrame({"id": ["17"], "sentence": ["a cat"]}),
         r"expected a 'text' column \(or a single column\), got columns \['id', 'sentence'\]"),
        (pd.DataFrame([["a cat", "a dog"]], columns=["text", "text"]), r"2 columns named 'text', expected one"),
        (np.array([["a cat"], ["a dog"]]), r"expected a flat list of texts, got an array of shape \(2, 1\)"),
        (["fine", "cut \ud83d"], r"text 1 is not valid Unicode: '\\ud83d' at character 4 \(a lone surrogate\)"),
        (7, r"expected texts .* got int"),
    ]
    for given, message in cases:
        with pytest.raises(MlflowException, match=message) as err:
            model.predict(given)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in err.value.message, given


def test_model_config_batch_size_is_honoured_and_checked(registered_student, onnx_reference):
    """A key the model was not saved with is dropped by MLflow with a warning: batch_size was
    documented but never reached the model."""
    import mlflow

    many = [f"text number {i} " + "word " * (i % 5) for i in range(7)]
    one = mlflow.pyfunc.load_model(registered_student["uri"], model_config={"batch_size": 1})
    assert one.unwrap_python_model().embedder.batch_size == 1
    np.testing.assert_allclose(one.predict(many), onnx_reference(registered_student["student"], many), atol=1e-5)
    for bad in (0, -1, "many", 2.5):
        with pytest.raises(ValueError, match=rf"model_config batch_size {bad!r}: expected a whole number"):
            mlflow.pyfunc.load_model(registered_student["uri"], model_config={"batch_size": bad})


def test_the_registered_model_holds_the_student_folder_and_pins_only_serving_packages(registered_student, tmp_path):
    import mlflow
    from transformers import AutoModel

    local = Path(mlflow.artifacts.download_artifacts(registered_student["uri"], dst_path=str(tmp_path / "dl")))
    folder = local / "artifacts" / "student"
    for name in ("model.safetensors", "tokenizer.json", "model.onnx", "model.int8.onnx", "kdnas_arch.json"):
        assert (folder / name).is_file(), name
    AutoModel.from_pretrained(folder)  # still the plain Hugging Face student
    requirements = (local / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in requirements) == ["mlflow", "numpy", "onnxruntime", "pandas", "tokenizers"]
    info = mlflow.models.get_model_info(registered_student["uri"])
    assert info.flavors["python_function"]["config"] == {"onnx": "fp32", "batch_size": 64}
    (spec,) = info.signature.outputs.inputs
    assert spec.type == np.dtype(np.float32) and tuple(spec.shape) == (-1, 32)
    # no run was left holding a half-built model folder
    assert not list(registered_student["tracker"].spool.parent.glob(".mlflow-model-*"))


def test_tracking_model_onnx_int8_serves_the_int8_file(registered_student, onnx_reference):
    import mlflow

    from infra.tracking import Tracker

    tracker = registered_student["tracker"]
    cfg = tracker.cfg.model_copy(update={"tracking": tracker.cfg.tracking.model_copy(update={"model_onnx": "int8"})})
    int8 = Tracker(cfg)
    reg = int8.register_student(int8.start_search("def456", 10.0, {}), registered_student["student"], ["int8"], {})
    assert reg["version"] != registered_student["version"]
    want = onnx_reference(registered_student["student"], TEXTS, "model.int8.onnx")
    np.testing.assert_allclose(mlflow.pyfunc.load_model(f"models:/{reg['model']}@budget-int8").predict(TEXTS), want,
                               atol=1e-5)
    # either file of any version, chosen when it is loaded
    fp32 = mlflow.pyfunc.load_model(f"models:/{reg['model']}@budget-int8", model_config={"onnx": "fp32"})
    np.testing.assert_allclose(fp32.predict(TEXTS), onnx_reference(registered_student["student"], TEXTS), atol=1e-5)


def test_a_student_without_its_onnx_file_is_refused_before_anything_is_logged(registered_student, tmp_path):
    import shutil

    from infra.tracking import TrackingError

    tracker = registered_student["tracker"]
    bare = tmp_path / "bare"
    shutil.copytree(registered_student["student"], bare)
    (bare / "model.onnx").unlink()
    parent = tracker.start_search("ghi789", 10.0, {})
    with pytest.raises(TrackingError, match=r"model\.onnx: missing; export the student"):
        tracker.register_student(parent, bare, ["0.5x"], {})
    assert not tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def test_the_model_loads_where_only_its_pinned_packages_exist(registered_student, tmp_path, onnx_reference):
    """No kdnas, torch or transformers in the consumer's environment: the model's code is its
    own file (models-from-code), not a pickle that refers to kdnas's modules."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(registered_student["uri"], dst_path=str(tmp_path / "dl"))
    script = f"""
import sys
for name in ("torch", "transformers", "kdnas_core", "infra", "kdnas", "sentence_transformers"):
    sys.modules[name] = None  # import fails
import json, mlflow
print(json.dumps(mlflow.pyfunc.load_model({local!r}).predict({TEXTS!r}).tolist()))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32)
    np.testing.assert_allclose(got, onnx_reference(registered_student["student"], TEXTS), atol=1e-5)
