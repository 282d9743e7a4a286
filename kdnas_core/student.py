"""Build, save and load students: Hugging Face encoder folders that ``AutoModel.from_pretrained``
and ``SentenceTransformer`` load.

Students share the teacher's tokenizer (or a corpus-trimmed copy of it) and its sentence pooling,
so a user swaps the teacher for the student without touching their preprocessing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from kdnas_core.files.atomic import (
    MANIFEST,
    PARTIAL_MARKER,
    commit_dir,
    damaged_files,
    discard_partial,
    disk_full_is_one_line,
    partial_dir,
    remove_stale_partials,
    write_manifest,
)
from kdnas_core.errors import ArchError
from kdnas_core.search.space import StudentArch
from kdnas_core.seeding import seed_torch
from kdnas_core.sentence import SentenceEncoder, SentenceHead, read_head, write_head

ARCH_FILE = "kdnas_arch.json"


class DamagedStudent(ArchError):
    pass
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


# Training holds weights, gradients and Adam's two moments: 16 bytes a parameter, before activations.
TRAINING_BYTES_PER_PARAM = 16


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_fits_in_memory(arch: StudentArch, teacher_config, bytes_per_param: int = 4) -> None:
    """Refuse, in one line, a student that cannot fit in this machine's free memory, before
    the allocator or the OOM killer meets it (a search space without ``cap_to_teacher``
    admits students far larger than the teacher)."""
    from kdnas_core.latency import count_params

    params = count_params(arch, teacher_config.vocab_size, teacher_config.max_position_embeddings)["total"]
    need, free = params * bytes_per_param, _available_memory()
    if free is not None and need > free:
        raise ArchError(f"arch {arch.name}: {params / 1e6:.0f} M parameters need about {need / 2**30:.1f} GiB "
                        f"{'to train' if bytes_per_param > 4 else 'to build'}, more than the {free / 2**30:.1f} GiB "
                        "of memory available; choose a smaller architecture")


def build_student(arch: StudentArch, teacher, seed: int = 0, init_from_teacher: bool = True,
                  dropout: float | None = None, bytes_per_param: int = 4) -> nn.Module:
    """A randomly initialised BERT student; embeddings start from the teacher's where possible.
    ``bytes_per_param``: the memory each parameter will need (checked before building)."""
    from transformers import BertModel

    check_fits_in_memory(arch, teacher.config, bytes_per_param)
    cfg = student_config(arch, teacher.config, teacher.tokenizer.pad_token_id, dropout)
    seed_torch(seed)
    # SDPA attention: the fastest exact kernel on CPU for training and inference.
    cfg._attn_implementation = "sdpa"
    model = BertModel(cfg)
    if init_from_teacher:
        init_embeddings_from_teacher(model, teacher.model)
    return model


def untrained_floor(config, seed: int) -> nn.Module:
    """The floor every row of an evaluation table is scored against: the model's own
    architecture (its config: class, shape, vocabulary) with every weight random, embeddings
    included. One rule for students and baselines alike, so gap closed means the same thing on
    every row; a floor with the teacher's embeddings copied in already scores near the teacher on
    some tasks and would make a student's gap closed meaningless."""
    import copy

    from transformers import AutoModel

    seed_torch(seed)
    return AutoModel.from_config(copy.deepcopy(config)).eval()


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


def is_student_folder(path: Path) -> bool:
    return (Path(path) / ARCH_FILE).is_file()


# What kdnas adds to a saved student after its manifest: the ONNX exports, and the temporary
# files an export leaves when it is killed.
_EXPORTED = ("model.onnx", "model.int8.onnx")
_EXPORT_TEMPORARY = re.compile(r"\.model(\.int8)?\.onnx(\..+)?\.tmp")


def foreign_files(folder: Path) -> list[str]:
    """Files and folders in a saved student that kdnas did not write (a user's notes or results
    put beside the weights). A student saved before manifests cannot tell: none reported."""
    folder = Path(folder)
    try:
        ours = set(json.loads((folder / MANIFEST).read_text())) | {MANIFEST, PARTIAL_MARKER, *_EXPORTED}
    except (OSError, ValueError, TypeError):
        return []
    ours_dirs = {parent.as_posix() for name in ours for parent in Path(name).parents}
    foreign = []
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if p.is_dir() and not p.is_symlink():
            if name not in ours_dirs and not any(q.is_file() for q in p.rglob("*")):
                foreign.append(name + "/")  # an empty folder of the user's; a full one shows by its files
        elif name not in ours and not _EXPORT_TEMPORARY.fullmatch(name):
            foreign.append(name)
    return foreign


def check_student_destination(out_dir: Path) -> None:
    """``out_dir`` may hold a student kdnas saved (replaced) or nothing; anything else is the
    user's and is never deleted: a folder that is not a student, and files a user added to one."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArchError(f"{out_dir}: is a file, expected a folder for the student")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_student_folder(out_dir):
        raise ArchError(f"{out_dir}: folder exists and is not a kdnas student (no {ARCH_FILE}); "
                        "choose an empty or new folder")
    foreign = foreign_files(out_dir) if out_dir.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ArchError(f"{out_dir}: holds files kdnas did not write ({shown}), and saving a student replaces the "
                        "whole folder; move them out or choose another folder")


def save_student(model: nn.Module, tokenizer, arch: StudentArch, out_dir: Path, meta: dict | None = None,
                 head: SentenceHead | None = None) -> Path:
    """Save as safetensors + tokenizer + sentence-transformers files (``head``, default mean
    pooling) + ``kdnas_arch.json`` + a sha256 manifest; written to a marked temporary folder and
    renamed, so a crash never leaves a half-saved student behind, and a student damaged later is
    noticed before it is reused."""
    out_dir = Path(out_dir)
    check_student_destination(out_dir)
    remove_stale_partials(out_dir.parent, f".{out_dir.name}-")
    tmp = partial_dir(out_dir.parent, f".{out_dir.name}-")
    try:
        with disk_full_is_one_line(out_dir, f"student {arch.name}"):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_head(tmp, head or SentenceHead(), model.config.hidden_size)
            info = {"arch": arch.to_dict(), "arch_id": arch.arch_id, "name": arch.name} | (meta or {})
            (tmp / ARCH_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
            write_manifest(tmp)
        old = None
        if out_dir.exists():  # a student kdnas saved earlier (checked above): replaced
            old = partial_dir(out_dir.parent, f".{out_dir.name}-")
            out_dir.rename(old / "replaced")
        commit_dir(tmp, out_dir)
        if old is not None:
            discard_partial(old)
    except BaseException:
        discard_partial(tmp)
        raise
    return out_dir


def verify_student(path: Path) -> None:
    """Raise a one-line error when a saved student is incomplete or its files changed since it
    was saved (truncated weights, edited ``kdnas_arch.json``)."""
    path = Path(path)
    if not is_student_folder(path):
        what = "no such folder" if not path.exists() else f"not a kdnas student folder (no {ARCH_FILE})"
        raise ArchError(f"{path}: {what}")
    bad = damaged_files(path)
    if bad:
        raise DamagedStudent(f"{path}: damaged student ({', '.join(bad)} changed since it was saved)")
    try:
        StudentArch.from_dict(json.loads((path / ARCH_FILE).read_text())["arch"])
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedStudent(f"{path}: damaged student ({ARCH_FILE} unreadable: {err})") from None


def saved_meta(path: Path) -> dict:
    """What ``save_student`` recorded beside the weights (arch, teacher, init, result)."""
    return json.loads((Path(path) / ARCH_FILE).read_text())


def load_student(path: Path, verify: bool = True) -> tuple[nn.Module, StudentArch]:
    from transformers import AutoModel

    path = Path(path)
    if verify:
        verify_student(path)
    arch = StudentArch.from_dict(json.loads((path / ARCH_FILE).read_text())["arch"])
    return AutoModel.from_pretrained(path, use_safetensors=True), arch


def load_sentence_student(path: Path, verify: bool = True) -> tuple[SentenceEncoder, StudentArch]:
    """A saved student with its sentence head: the embedding users get from the folder. A
    student saved before kdnas wrote sentence-transformers files pools by mean."""
    model, arch = load_student(path, verify)
    return SentenceEncoder(model, read_head(path) or SentenceHead()), arch


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
