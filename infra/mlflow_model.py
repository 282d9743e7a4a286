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
from mlflow.exceptions import MlflowException

try:  # inside a saved model: MLflow put the model's code/ folder (with onnx_embedder.py) on sys.path
    from onnx_embedder import BATCH_SIZE, OnnxEmbedder
except ImportError:  # imported by kdnas itself, to build the model
    from kdnas_core.onnx_embedder import BATCH_SIZE, OnnxEmbedder


def texts_of(model_input) -> list[str]:
    """A list of strings, a pandas Series, a DataFrame (or a dict of columns) with a ``text``
    column or a single column, or one string. Anything else, and any text that is not a string
    (a number, None, NaN), is a one-line TypeError or ValueError: embedding ``str(x)`` of a
    missing value would answer a question nobody asked."""
    if isinstance(model_input, dict):  # {"inputs": {"text": [...]}} over HTTP arrives as a dict of columns
        model_input = pd.DataFrame({k: pd.Series(v if np.ndim(v) else [v], dtype=object)
                                    for k, v in model_input.items()})
    if isinstance(model_input, pd.DataFrame):
        columns = list(model_input.columns)
        if "text" in columns:
            if columns.count("text") > 1:  # df["text"] would be a DataFrame, and list() of it its labels
                raise ValueError(f"the input has {columns.count('text')} columns named 'text', expected one")
            model_input = model_input["text"]
        elif len(columns) == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a 'text' column (or a single column), got columns {columns}")
    if isinstance(model_input, np.ndarray) and model_input.ndim == 0:  # {"inputs": "one text"} over HTTP
        model_input = model_input.item()
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        raise TypeError(f"expected texts (a list of strings, a Series or a DataFrame with a 'text' column), "
                        f"got {type(model_input).__name__}")
    if isinstance(model_input, np.ndarray) and model_input.ndim != 1:
        raise ValueError(f"expected a flat list of texts, got an array of shape {model_input.shape}")
    texts = list(model_input)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"text {bad} is {type(texts[bad]).__name__} {texts[bad]!r}, expected a string")
    for i, t in enumerate(texts):
        # A lone surrogate (JSON "\ud800", or a client that cut an emoji in half) is a str the
        # tokenizer refuses with a TypeError that names no text.
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text {i} is not valid Unicode: {t[err.start]!r} at character {err.start} "
                             "(a lone surrogate)") from None
    return texts


class StudentEncoder(mlflow.pyfunc.PythonModel):
    """``predict`` returns a float32 array [n_texts, dim], one sentence embedding per text, in
    the order given. ``model_config``: ``onnx`` (``fp32`` | ``int8``, which exported file runs;
    kdnas sets it from ``tracking.model_onnx``), ``batch_size``."""

    def load_context(self, context) -> None:
        config = context.model_config or {}
        self.open(Path(context.artifacts["student"]), config.get("onnx", "fp32"),
                  config.get("batch_size", BATCH_SIZE))

    def open(self, folder: Path, onnx: str = "fp32", batch_size: int = BATCH_SIZE) -> StudentEncoder:
        if isinstance(batch_size, str) and batch_size.strip().isdigit():  # a model_config read from text
            batch_size = int(batch_size)
        # bool is an int, and a batch size below 1 makes OnnxEmbedder skip every batch: all-zero embeddings
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"model_config batch_size {batch_size!r}: expected a whole number of texts, 1 or more")
        self.embedder = OnnxEmbedder(folder, onnx, batch_size)
        self.dim = self.embedder.dim
        return self

    # The registered signature declares no inputs (infra/tracking.py save_student_model), so the
    # input arrives as the caller gave it and texts_of is the only check. A DataFrame hint is one
    # MLflow neither validates against nor derives a signature from; without a hint it warns on
    # every load.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        try:
            texts = texts_of(model_input)
        except (TypeError, ValueError) as err:
            # MLflow's scoring server answers an MlflowException with its code (400) and message;
            # any other error becomes a 400 that says only "unexpected error" and a traceback.
            raise MlflowException.invalid_parameter_value(str(err)) from None
        return self.embed(texts)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder(texts)


mlflow.models.set_model(StudentEncoder())
