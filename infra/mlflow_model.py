"""A registered kdnas student as an MLflow pyfunc model: texts in, sentence embeddings out.

This file is logged as *models-from-code* (``python_model=<this file's path>``): MLflow copies it
into the model (``code/mlflow_model.py``) and runs it when the model is loaded, instead of
unpickling a ``PythonModel`` object. A pickled object would refer to ``infra.mlflow_model`` by
import path, so every consumer would need kdnas installed (and a compatible cloudpickle); this
file needs only what the model pins: mlflow, onnxruntime, tokenizers, numpy, pandas. So it must
import nothing from kdnas (``kdnas_core.data.tokenize`` is mirrored below, not imported).

The work is done by the exported ONNX file (``model.onnx`` or ``model.int8.onnx``): token ids and
attention mask in, the finished sentence embedding out (pooling, teacher-space layer and
normalisation are inside the graph), so there is no torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
OUTPUT = "sentence_embedding"  # the exported graph's output (kdnas_core.latency.export_onnx)
BATCH_SIZE = 64
# As kdnas_core.data: a text longer than max_length tokens can cover is cut before tokenising, so
# one huge request body costs no more memory than its kept tokens (no token spans more characters).
CHARS_PER_TOKEN_BOUND = 128


def max_seq_length(folder: Path) -> int:
    """The student's sequence limit as sentence-transformers reads it (the tokenizer's own limit
    for a folder saved without one), never past the model's position table."""
    def read(name: str, key: str):
        f = folder / name
        value = json.loads(f.read_text()).get(key) if f.is_file() else None
        # HF writes a huge sentinel (1e30) as model_max_length when the tokenizer has no limit
        return value if isinstance(value, int) and 0 < value < 1_000_000 else None

    limit = read("sentence_bert_config.json", "max_seq_length") or read("tokenizer_config.json", "model_max_length")
    if limit is None:
        raise ValueError(f"{folder}: no sequence limit found (max_seq_length in sentence_bert_config.json or "
                         "model_max_length in tokenizer_config.json)")
    return min(limit, read("config.json", "max_position_embeddings") or limit)


def _pad_token(folder: Path) -> str | None:
    f = folder / "tokenizer_config.json"
    pad = json.loads(f.read_text()).get("pad_token") if f.is_file() else None
    return pad.get("content") if isinstance(pad, dict) else pad  # older files store an AddedToken dict


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
        self.open(Path(context.artifacts["student"]), config.get("onnx", "fp32"),
                  int(config.get("batch_size", BATCH_SIZE)))

    def open(self, folder: Path, onnx: str = "fp32", batch_size: int = BATCH_SIZE) -> StudentEncoder:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if onnx not in ONNX_FILES:
            raise ValueError(f"model_config onnx = {onnx!r}: expected one of {sorted(ONNX_FILES)}")
        folder = Path(folder)
        path = folder / ONNX_FILES[onnx]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the student was registered without its {onnx} ONNX file")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder / 'tokenizer.json'}: missing (a fast tokenizer file is needed)")
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = {o.name: o for o in self.session.get_outputs()}
        if OUTPUT not in outputs:
            raise ValueError(f"{path}: no {OUTPUT!r} output (it has {sorted(outputs)}); export the student again")
        self.dim = outputs[OUTPUT].shape[-1]
        self.max_length = max_seq_length(folder)
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # The file's own padding/truncation settings are whatever the saving run left there;
        # truncation is set to the student's limit and batches are padded below.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        pad = _pad_token(folder)
        self.pad_id = (self.tokenizer.token_to_id(pad) if pad else None) or 0
        return self

    # Through pyfunc, MLflow has turned the input into a one-column DataFrame by the signature; a
    # DataFrame hint is one MLflow derives no signature from (other hints would replace the
    # registered signature), and without a hint it warns on every load. Called directly, any
    # input texts_of takes is fine.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        return self.embed(texts_of(model_input))

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        limit = self.max_length * CHARS_PER_TOKEN_BOUND
        ids = [e.ids for e in self.tokenizer.encode_batch([t[:limit] for t in texts])]
        # Texts of similar length share a batch, so little compute goes to padding.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in index)
            input_ids = np.full((len(index), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(index), width), dtype=np.int64)
            for row, i in enumerate(index):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            (emb,) = self.session.run([OUTPUT], {"input_ids": input_ids, "attention_mask": mask})
            out[index] = emb
        return out


mlflow.models.set_model(StudentEncoder())
