"""Sentence embeddings as sentence-transformers computes them: token states pooled (mean, CLS or
max), then optional Dense layers, then optional L2 normalisation.

A teacher that is a sentence-embedding model says how in its own folder (``modules.json``,
``1_Pooling/config.json``, ``2_Dense/``...). kdnas reads that description, distils its students
towards the embedding it defines, and writes the same kind of description into every student
folder, so ``SentenceTransformer(student_folder)`` embeds exactly as kdnas does. The files are
read and written here without the sentence-transformers library: users need not install it.

With ``export.teacher_space`` the distillation's learned pooled projection (student width ->
teacher width), followed by the teacher's own Dense layers, is the student's last layer, so its
embeddings live in the teacher's space and can query an index the teacher built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdnas_core.errors import KdnasError
from kdnas_core.pooling import masked_mean_pool

POOLING_MODES = ("mean", "cls", "max")
_ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
_ACTIVATIONS = {"torch.nn.modules.linear.Identity": nn.Identity, "torch.nn.modules.activation.Tanh": nn.Tanh}
_ST = "sentence_transformers.models."


@dataclass(frozen=True)
class Dense:
    """One sentence-transformers Dense layer: ``activation(x @ weight.T + bias)``."""

    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None = None
    activation: str = "torch.nn.modules.linear.Identity"

    def module(self) -> nn.Module:
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return nn.Sequential(lin, _ACTIVATIONS[self.activation]())


@dataclass(frozen=True)
class SentenceHead:
    """What turns token states into one sentence embedding."""

    pooling: str = "mean"
    dense: tuple[Dense, ...] = field(default=())
    normalize: bool = False
    max_seq_length: int | None = None

    @property
    def teacher_space(self) -> bool:
        return bool(self.dense)

    def without_dense(self, max_seq_length: int | None = None) -> SentenceHead:
        """This pooling and normalisation on a model's own width (a student's floor, a student
        outside the teacher's space)."""
        return SentenceHead(self.pooling, (), self.normalize, max_seq_length)

    def with_projection(self, projection: nn.Linear, teacher: SentenceHead) -> SentenceHead:
        """This pooling, then ``projection`` (student -> teacher width) and the teacher's own Dense
        layers and normalisation: embeddings in the teacher's space."""
        first = Dense(projection.weight.detach().clone().float(),
                      None if projection.bias is None else projection.bias.detach().clone().float())
        return SentenceHead(self.pooling, (first, *teacher.dense), teacher.normalize, self.max_seq_length)


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Token states [B, T, d] to [B, d] over the real tokens of ``mask`` [B, T]."""
    if mode == "mean":
        return masked_mean_pool(states, mask)
    if mode == "cls":
        return states[:, 0]
    if mode == "max":
        # as sentence-transformers: padding positions set to a large negative value first
        return states.masked_fill(~mask.bool().unsqueeze(-1), -1e9).max(1).values
    raise KdnasError(f"pooling {mode!r} is not supported; expected one of {', '.join(POOLING_MODES)}")


class SentenceEncoder(nn.Module):
    """An encoder with its sentence head: ``forward(input_ids, attention_mask)`` gives [B, dim]
    sentence embeddings. This is what is evaluated, exported to ONNX and served."""

    def __init__(self, encoder: nn.Module, head: SentenceHead):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.dense = nn.Sequential(*(d.module() for d in head.dense))

    @property
    def config(self):
        return self.encoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        x = self.dense(pool(states, attention_mask, self.head.pooling))
        return nn.functional.normalize(x, dim=-1) if self.head.normalize else x


# ------------------------------------------------------------------------------ files


def _modules(folder: Path) -> list[dict] | None:
    path = folder / "modules.json"
    if not path.is_file():
        return None
    try:
        modules = json.loads(path.read_text())
        return sorted(modules, key=lambda m: int(m["idx"]))
    except (ValueError, KeyError, TypeError) as err:
        raise KdnasError(f"{path}: not a sentence-transformers modules list ({err})") from None


def read_head(folder: str | Path) -> SentenceHead | None:
    """The sentence head a folder's sentence-transformers files describe; None when it has none
    (a plain Hugging Face encoder: kdnas then pools by mean, unnormalised)."""
    folder = Path(folder)
    modules = _modules(folder)
    if modules is None:
        return None
    pooling, dense, normalize = "mean", [], False
    for m in modules:
        kind, sub = m.get("type", ""), folder / m.get("path", "")
        if kind == _ST + "Pooling":
            cfg = json.loads((sub / "config.json").read_text())
            on = [mode for mode, key in _ST_POOLING.items() if cfg.get(key)]
            if len(on) != 1:
                raise KdnasError(f"{sub / 'config.json'}: kdnas supports exactly one of mean, CLS or max pooling, "
                                 f"found {on or 'none'}")
            pooling = on[0]
        elif kind == _ST + "Dense":
            dense.append(_read_dense(sub))
        elif kind == _ST + "Normalize":
            normalize = True
        elif kind != _ST + "Transformer":
            raise KdnasError(f"{folder / 'modules.json'}: module {kind!r} is not supported "
                             "(kdnas reads Transformer, Pooling, Dense and Normalize)")
    max_len = None
    if (folder / "sentence_bert_config.json").is_file():
        max_len = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
    return SentenceHead(pooling, tuple(dense), normalize, max_len)


def _read_dense(sub: Path) -> Dense:
    from safetensors.torch import load_file

    cfg = json.loads((sub / "config.json").read_text())
    weights = sub / "model.safetensors"
    if not weights.is_file():  # never unpickle: pytorch_model.bin is refused
        raise KdnasError(f"{sub}: Dense layer without model.safetensors (kdnas does not load pickled weights)")
    state = load_file(str(weights))
    act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act not in _ACTIVATIONS:
        raise KdnasError(f"{sub / 'config.json'}: activation {act!r} is not supported "
                         f"(expected one of {', '.join(_ACTIVATIONS)})")
    return Dense(state["linear.weight"].float(), state.get("linear.bias"), act)


def write_head(folder: str | Path, head: SentenceHead, hidden: int) -> None:
    """Write the sentence-transformers description of ``head`` into a model folder (the
    transformer's own files are already there)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST + "Transformer"}]
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, **{key: mode == head.pooling for mode, key in _ST_POOLING.items()},
         "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST + "Pooling"})
    for d in head.dense:
        i = len(modules)
        sub = folder / f"{i}_Dense"
        sub.mkdir(exist_ok=True)
        (sub / "config.json").write_text(json.dumps(
            {"in_features": d.weight.shape[1], "out_features": d.weight.shape[0], "bias": d.bias is not None,
             "activation_function": d.activation}, indent=2))
        tensors = {"linear.weight": d.weight.contiguous()} | ({} if d.bias is None else {"linear.bias": d.bias.contiguous()})
        save_file(tensors, str(sub / "model.safetensors"))
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Dense", "type": _ST + "Dense"})
    if head.normalize:
        i = len(modules)
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Normalize", "type": _ST + "Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    sbert = {"do_lower_case": False} | ({"max_seq_length": head.max_seq_length} if head.max_seq_length else {})
    (folder / "sentence_bert_config.json").write_text(json.dumps(sbert, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
         "similarity_fn_name": "cosine", "__version__": {"kdnas": "written by kdnas, read without the library"}},
        indent=2))


def teacher_head(name_or_path: str) -> SentenceHead | None:
    """The sentence head of a teacher: from its folder, or from the hub's copy of its files when
    it is a hub id (None when it has no sentence-transformers files or they cannot be fetched)."""
    path = Path(name_or_path)
    if path.is_dir():
        return read_head(path)
    try:
        from transformers.utils import cached_file

        modules = cached_file(name_or_path, "modules.json", _raise_exceptions_for_missing_entries=False,
                              _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - offline or not a hub id: no sentence head
        return None
    if modules is None:
        return None
    folder = Path(modules).parent
    for m in _modules(folder) or []:  # fetch what modules.json points at, so read_head finds it
        for f in ("config.json", "model.safetensors"):
            if m.get("path"):
                cached_file(name_or_path, f"{m['path']}/{f}", _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    cached_file(name_or_path, "sentence_bert_config.json", _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False)
    return read_head(folder)
