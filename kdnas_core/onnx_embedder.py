"""Sentence embeddings from a student folder's ONNX file, with ONNX Runtime and the `tokenizers`
library only: what `kdnas embed` and the registered MLflow model run.

No torch and no transformers are imported here, so a serving environment needs only numpy,
onnxruntime and tokenizers. The ONNX file takes ``input_ids`` and ``attention_mask`` and gives
the finished ``sentence_embedding`` (kdnas_core/final.py export_student).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
DEFAULT_MAX_LENGTH = 512


class EmbedError(ValueError):
    """A folder or input that cannot be embedded; the message is one line."""


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def max_length_of(folder: Path) -> int:
    """The sequence length the student was distilled at (sentence_bert_config.json), bounded by
    what the tokenizer allows."""
    n = _json(folder / "sentence_bert_config.json").get("max_seq_length") or DEFAULT_MAX_LENGTH
    limit = _json(folder / "tokenizer_config.json").get("model_max_length")
    return int(min(n, limit)) if isinstance(limit, int) and limit > 0 else int(n)


def _pad_token(folder: Path) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        pad = _json(folder / name).get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if pad:
            return pad
    return None


class OnnxEmbedder:
    """``OnnxEmbedder(folder)(texts)`` -> float32 array [len(texts), dim]."""

    def __init__(self, folder: str | Path, precision: str = "fp32", threads: int | None = None,
                 batch_size: int = 64):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        if precision not in ONNX_FILES:
            raise EmbedError(f"precision {precision!r}: expected one of {', '.join(ONNX_FILES)}")
        onnx = self.folder / ONNX_FILES[precision]
        if not onnx.is_file():
            raise EmbedError(f"{onnx}: no such file (a student folder holds it once exported)")
        if not (self.folder / "tokenizer.json").is_file():
            raise EmbedError(f"{self.folder / 'tokenizer.json'}: no such file (the student's fast tokenizer)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in self.session.get_outputs()]
        if outputs != ["sentence_embedding"]:
            raise EmbedError(f"{onnx}: outputs {outputs}, expected ['sentence_embedding'] "
                             "(exported before kdnas put pooling into the graph? export it again)")
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length_of(self.folder))
        pad = _pad_token(self.folder)
        pad_id = self.tokenizer.token_to_id(pad) if pad else None
        self.tokenizer.enable_padding(pad_id=pad_id or 0, pad_token=pad or "[PAD]")
        self.batch_size = batch_size
        self.dim = self.session.get_outputs()[0].shape[-1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        out = np.empty((len(texts), self.dim if isinstance(self.dim, int) else 0), dtype=np.float32)
        # Similar lengths share a batch: little padding, and the result does not depend on it.
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
            (emb,) = self.session.run(None, feed)
            if out.shape[1] != emb.shape[1]:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        return out
