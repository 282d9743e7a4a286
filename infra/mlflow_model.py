"""A registered kdnas student as an MLflow pyfunc model: texts in, sentence embeddings out.

This file is logged as *models-from-code* (``python_model=<this file's path>``): MLflow copies it
into the model (``code/mlflow_model.py``) and runs it when the model is loaded, instead of
unpickling a ``PythonModel`` object. A pickled object would refer to ``infra.mlflow_model`` by
import path, so every consumer would need kdnas installed (and a compatible cloudpickle); this
file needs only what the model pins: mlflow, onnxruntime, tokenizers, numpy, pandas. The one
piece of kdnas it runs, kdnas_core/onnx_embedder.py (tokenise, batch, run the ONNX file; no
torch), is shipped beside it as a code file of the model.

The work is done by the exported ONNX file (``model.onnx`` or ``model.int8.onnx``): token ids and
attention mask in, the finished sentence embedding out (pooling, teacher-space layer and
normalisation are inside the graph), so there is no torch here.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

try:  # inside a saved model: MLflow put the model's code/ folder (with onnx_embedder.py) on sys.path
    from onnx_embedder import OnnxEmbedder
except ImportError:  # imported by kdnas itself, to build the model
    from kdnas_core.onnx_embedder import OnnxEmbedder


def texts_of(model_input) -> list[str]:
    """A list of strings, a pandas Series, a DataFrame with a ``text`` column (or a single
    column), or one string."""
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            model_input = model_input["text"]
        elif model_input.shape[1] == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a DataFrame with a 'text' column, got columns {list(model_input.columns)}")
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        raise TypeError(f"expected texts (a list of strings, a Series or a DataFrame with a 'text' column), "
                        f"got {type(model_input).__name__}")
    texts = list(model_input)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"text {bad} is {type(texts[bad]).__name__} {texts[bad]!r}, expected a string")
    return texts


class StudentEncoder(mlflow.pyfunc.PythonModel):
    """``predict`` returns a float32 array [n_texts, dim], one sentence embedding per text, in
    the order given. ``model_config``: ``onnx`` (``fp32`` | ``int8``, which exported file runs;
    kdnas sets it from ``tracking.model_onnx``), ``batch_size``."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.open(Path(context.artifacts["student"]), config.get("onnx", "fp32"), int(config.get("batch_size", 64)))

    def open(self, folder: Path, onnx: str = "fp32", batch_size: int = 64) -> StudentEncoder:
        self.embedder = OnnxEmbedder(folder, onnx, batch_size)
        self.dim = self.embedder.dim
        return self

    # Through pyfunc, MLflow has turned the input into a one-column DataFrame by the signature; a
    # DataFrame hint is one MLflow derives no signature from (other hints would replace the
    # registered signature), and without a hint it warns on every load. Called directly, any
    # input texts_of takes is fine.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return self.embed(texts_of(model_input))

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder(texts)


mlflow.models.set_model(StudentEncoder())
