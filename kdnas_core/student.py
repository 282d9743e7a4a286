"""Build, save and load students: plain ``BertModel``s that ``AutoModel.from_pretrained`` loads.

Students share the teacher's tokenizer and vocabulary, so a user swaps the teacher for the
student without touching their preprocessing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from kdnas_core.errors import ArchError
from kdnas_core.search_space import StudentArch

ARCH_FILE = "kdnas_arch.json"
# BERT's initializer_range: embeddings projected from the teacher are rescaled to this std so the
# student starts in the numeric range its LayerNorms and attention were initialised for.
INIT_STD = 0.02


def student_config(arch: StudentArch, teacher_config, pad_token_id: int | None, dropout: float | None = None):
    from transformers import BertConfig

    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return BertConfig(
        **extra,
        vocab_size=teacher_config.vocab_size,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        intermediate_size=arch.ffn,
        hidden_act=arch.activation,
        max_position_embeddings=teacher_config.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=pad_token_id if pad_token_id is not None else 0,
    )


def build_student(arch: StudentArch, teacher, seed: int = 0, init_from_teacher: bool = True,
                  dropout: float | None = None) -> nn.Module:
    """A randomly initialised BERT student; embeddings start from the teacher's where possible."""
    from transformers import BertModel

    cfg = student_config(arch, teacher.config, teacher.tokenizer.pad_token_id, dropout)
    torch.manual_seed(seed)
    # SDPA attention: the fastest exact kernel on CPU for training and inference.
    cfg._attn_implementation = "sdpa"
    model = BertModel(cfg)
    if init_from_teacher:
        init_embeddings_from_teacher(model, teacher.model)
    return model


def _embedding(model: nn.Module, name: str) -> nn.Embedding | None:
    emb = getattr(model, "embeddings", None)
    mod = getattr(emb, name, None)
    return mod if isinstance(mod, nn.Embedding) else None


@torch.no_grad()
def init_embeddings_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Copy the teacher's word and position embeddings into the student.

    Same width: a plain copy. Narrower student: project onto the top-``d`` principal components
    of the teacher's (centred) word-embedding matrix, which keeps the directions that tell tokens
    apart, then rescale to std ``INIT_STD``. Position embeddings go through the same basis so
    words and positions stay in one coordinate system. A wider student keeps its random init.
    """
    t_words, s_words = _embedding(teacher, "word_embeddings"), _embedding(student, "word_embeddings")
    if t_words is None or s_words is None or t_words.weight.shape[0] != s_words.weight.shape[0]:
        return
    d_t, d_s = t_words.weight.shape[1], s_words.weight.shape[1]
    if d_s > d_t:
        return
    w = t_words.weight.float()
    if d_s == d_t:
        basis = torch.eye(d_t)
        mean = torch.zeros(d_t)
        scale = 1.0
    else:
        mean = w.mean(0)
        centred = w - mean
        cov = centred.T @ centred / w.shape[0]
        _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
        basis = vecs[:, -d_s:].flip(1)
        scale = INIT_STD / float((centred @ basis).std())
    s_words.weight.copy_((w - mean) @ basis * scale)
    t_pos, s_pos = _embedding(teacher, "position_embeddings"), _embedding(student, "position_embeddings")
    if t_pos is not None and s_pos is not None:
        rows = min(t_pos.weight.shape[0], s_pos.weight.shape[0])
        p = t_pos.weight[:rows].float()
        s_pos.weight[:rows].copy_((p - p.mean(0)) @ basis * scale if d_s < d_t else p)


def save_student(model: nn.Module, tokenizer, arch: StudentArch, out_dir: Path, meta: dict | None = None) -> Path:
    """Save as safetensors + tokenizer + ``kdnas_arch.json``; written to a temporary folder and
    renamed, so a crash never leaves a half-saved student behind."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}-*"):  # left by a save that was killed
        if stale.is_dir() and not stale.name.endswith(".ckpt"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"arch": arch.to_dict(), "arch_id": arch.arch_id, "name": arch.name} | (meta or {})
        (tmp / ARCH_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_student(path: Path) -> tuple[nn.Module, StudentArch]:
    from transformers import AutoModel

    path = Path(path)
    arch_file = path / ARCH_FILE
    if not arch_file.is_file():
        raise ArchError(f"{path}: not a kdnas student folder (no {ARCH_FILE})")
    arch = StudentArch.from_dict(json.loads(arch_file.read_text())["arch"])
    return AutoModel.from_pretrained(path, use_safetensors=True), arch


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
