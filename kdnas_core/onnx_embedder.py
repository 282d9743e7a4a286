"""Sentence embeddings from a student folder's ONNX file, with ONNX Runtime and the `tokenizers`
library only: what `kdnas embed` and the registered MLflow model run.

This module imports nothing from kdnas, torch or transformers: the registered MLflow model ships
it as a code file (infra/mlflow_model.py), so a serving environment needs only numpy,
onnxruntime and tokenizers. The ONNX file takes ``input_ids`` and ``attention_mask`` and gives
the finished ``sentence_embedding`` (kdnas_core/final.py export_student).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
OUTPUT = "sentence_embedding"  # the exported graph's output (kdnas_core.latency.export_onnx)
BATCH_SIZE = 64
# As kdnas_core.data: a text longer than max_length tokens can cover is cut before tokenising, so
# one huge input costs no more memory than its kept tokens (no token spans more characters).
CHARS_PER_TOKEN_BOUND = 128


class EmbedError(ValueError):
    """A folder that cannot be embedded with; the message is one line."""


def _read_int(folder: Path, name: str, key: str) -> int | None:
    f = folder / name
    try:
        value = json.loads(f.read_text()).get(key) if f.is_file() else None
    except ValueError:
        return None
    # HF writes a huge sentinel (1e30) as model_max_length when the tokenizer has no limit
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def max_seq_length(folder: Path) -> int:
    """The student's sequence limit as sentence-transformers reads it (the tokenizer's own limit
    for a folder saved without one), never past the model's position table."""
    folder = Path(folder)
    limit = (_read_int(folder, "sentence_bert_config.json", "max_seq_length")
             or _read_int(folder, "tokenizer_config.json", "model_max_length"))
    if limit is None:
        raise EmbedError(f"{folder}: no sequence limit found (max_seq_length in sentence_bert_config.json or "
                         "model_max_length in tokenizer_config.json)")
    return min(limit, _read_int(folder, "config.json", "max_position_embeddings") or limit)


def _pad_token(folder: Path) -> str | None:
    f = folder / "tokenizer_config.json"
    try:
        pad = json.loads(f.read_text()).get("pad_token") if f.is_file() else None
    except ValueError:
        return None
    return pad.get("content") if isinstance(pad, dict) else pad  # older files store an AddedToken dict


class OnnxEmbedder:
    """``OnnxEmbedder(folder)(texts)`` -> float32 array [len(texts), dim], in the order given."""

    def __init__(self, folder: str | Path, precision: str = "fp32", batch_size: int = BATCH_SIZE,
                 threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        if precision not in ONNX_FILES:
            raise EmbedError(f"ONNX precision {precision!r}: expected one of {', '.join(ONNX_FILES)}")
        path = folder / ONNX_FILES[precision]
        if not path.is_file():
            raise EmbedError(f"{path}: no such file (a student folder holds it once exported)")
        if not (folder / "tokenizer.json").is_file():
            raise EmbedError(f"{folder / 'tokenizer.json'}: missing (a fast tokenizer file is needed)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise EmbedError(f"{path}: not a readable ONNX file ({str(err).splitlines()[0]})") from None
        outputs = {o.name: o for o in self.session.get_outputs()}
        if OUTPUT not in outputs:
            raise EmbedError(f"{path}: no {OUTPUT!r} output (it has {sorted(outputs)}); export the student again")
        self.dim = outputs[OUTPUT].shape[-1]
        self.max_length = max_seq_length(folder)
        self.batch_size = batch_size
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a damaged file
            raise EmbedError(f"{folder / 'tokenizer.json'}: not a readable tokenizer file "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        # As kdnas_core.teachers.loading.tokenizer_problem: a tokenizer far smaller than the model's
        # vocabulary (another model's, or an empty one) would embed nearly every word as [UNK].
        vocab = _read_int(folder, "config.json", "vocab_size")
        if vocab is not None and self.tokenizer.get_vocab_size() < vocab // 2:
            raise EmbedError(f"{folder / 'tokenizer.json'}: {self.tokenizer.get_vocab_size()} tokens for the model's "
                             f"{vocab}-token vocabulary; the folder's tokenizer does not belong to its model")
        # The file's own padding/truncation settings are whatever the saving run left there:
        # truncation is set to the student's limit, and batches are padded below.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        pad = _pad_token(folder)
        self.pad_id = (self.tokenizer.token_to_id(pad) if pad else None) or 0

    def __call__(self, texts: list[str]) -> np.ndarray:
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
