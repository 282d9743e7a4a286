"""Multi-layer hidden-state distillation (KD-NAS, Trivedi et al. 2023), plus the teacher-state cache.

Each student hidden state (index 0 = embeddings, i = output of layer i) learns from one or more
teacher hidden states through a learned linear projection from the student's width to the
teacher's. The default "uniform + last" mapping pairs student layer i with teacher layers
``i * (L_T // L_S)`` and ``L_T - L_S + i``.

What the paper leaves open and the distillation pilot (docs/distillation.md)
settled: targets are standardised per teacher layer and dimension (raw MSE is dominated by a
few huge dimensions and transfers nothing), and a pooled-output cosine term carries the sentence
embedding of a sentence-embedding teacher. Both are config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdnas_core.checkpoint import UnusableCheckpoint, find_checkpoint, load_checkpoint, remove_checkpoint, save_checkpoint
from kdnas_core.config import DistillConfig, LossWeights, TrainBudget
from kdnas_core.data import Batch, TokenizedTexts, length_bucketed_batches, tokenize
from kdnas_core.progress import Bar, Progress, track
from kdnas_core.atomic import (
    check_free_space,
    commit_dir,
    discard_partial,
    disk_full_is_one_line,
    partial_dir,
    remove_stale_partials,
    sha256_file,
    write_npy,
)
from kdnas_core.errors import ConfigError, KdnasError
from kdnas_core.sentence import pool
from kdnas_core.seeding import seed_torch
from kdnas_core.teachers import Teacher, find_qkv

MAPPINGS = ("uniform", "last", "uniform+last", "all-to-one")


# --------------------------------------------------------------------------- layer mapping


def layer_mapping(n_student: int, n_teacher: int, strategy: str) -> list[tuple[int, ...]]:
    """Teacher hidden-state indices each student hidden state learns from.

    Returns ``n_student + 1`` tuples: entry 0 maps embeddings to embeddings; entry i (1-based
    student layer) lists teacher layers. "all-to-one" sends every student layer to the teacher's
    last layer.
    """
    if strategy not in MAPPINGS:
        raise KdnasError(f"distill.mapping = {strategy!r}: expected one of {', '.join(MAPPINGS)}")
    step = n_teacher // n_student
    out: list[tuple[int, ...]] = [(0,)]
    for i in range(1, n_student + 1):
        # A student deeper than its teacher (step 0) spreads its layers evenly instead.
        uniform = i * step if step else max(1, round(i * n_teacher / n_student))
        last = max(1, n_teacher - n_student + i)
        chosen = {
            "uniform": (uniform,),
            "last": (last,),
            "uniform+last": tuple(dict.fromkeys((uniform, last))),
            "all-to-one": (n_teacher,),
        }[strategy]
        out.append(chosen)
    return out


def teacher_layers_needed(
    student_layers: list[int] | tuple[int, ...], n_teacher: int, strategy: str, weights: LossWeights
) -> tuple[int, ...]:
    """Union of teacher states that students with any of ``student_layers`` layers need, so one
    cache serves a whole search space."""
    need: set[int] = set()
    for n in student_layers if weights.hidden_mse > 0 else ():  # only the hidden-state term maps layers
        for targets in layer_mapping(n, n_teacher, strategy):
            need.update(targets)
    if weights.attention_relation > 0:
        need.add(n_teacher)  # the relation layer's states ride along with its Q/K/V
    if weights.pooled_cosine > 0:
        need.add(n_teacher)
    return tuple(sorted(need))


# --------------------------------------------------------------------------- teacher states


class CorruptCache(KdnasError):
    pass


@dataclass(frozen=True)
class LayerStats:
    """Per-layer, per-dimension mean and std of teacher states over non-padding tokens."""

    layers: tuple[int, ...]
    mean: torch.Tensor  # [n_layers, d]
    std: torch.Tensor  # [n_layers, d]


@dataclass
class Targets:
    states: dict[int, torch.Tensor]  # teacher layer -> [B, T, d] float32
    qkv: torch.Tensor | None = None  # [B, T, 3 * d] of the relation layer, or None
    # The pooled term's target for texts with a source sentence (a translation's original):
    # [B, d] the teacher's pooled embedding of the source, used where has_source [B] is true.
    source_pooled: torch.Tensor | None = None
    has_source: torch.Tensor | None = None
    # [B, d] the teacher's pooled embedding of each text itself, when the states were reduced to
    # it (PooledTeacherStates): then ``states`` is empty.
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device) -> Targets:
        move = lambda x: x.to(device) if x is not None else None  # noqa: E731
        return Targets({k: v.to(device) for k, v in self.states.items()}, move(self.qkv), move(self.source_pooled),
                       move(self.has_source), move(self.pooled))


class SharedStates(Protocol):
    """Teacher-state caches shared between machines (e.g. an S3 prefix), so that Dask workers
    elsewhere do not each run the teacher again."""

    def fetch(self, key: str, dest: Path) -> bool:
        """Put the complete cache ``key`` at ``dest`` (atomically) if it was published."""
        ...

    def publish(self, key: str, src: Path) -> None:
        """Make the complete local cache ``src`` available as ``key`` (no-op if it is)."""
        ...


class TeacherStates(Protocol):
    """Where distillation targets come from: a live teacher or the cache."""

    n_layers: int
    hidden: int
    layers: tuple[int, ...]
    relation_layer: int | None
    stats: LayerStats | None

    def targets(self, batch: Batch) -> Targets: ...


class _QKVCapture:
    """Forward hooks that record the outputs of a layer's query/key/value projections."""

    def __init__(self, model: nn.Module, layer: int | None):
        self.outputs: list[torch.Tensor] = []
        self.handles = []
        if layer is not None:
            for mod in find_qkv(model, layer):
                self.handles.append(mod.register_forward_hook(lambda _m, _i, out: self.outputs.append(out)))

    def take(self) -> tuple[torch.Tensor, ...] | None:
        if not self.handles:
            return None
        out, self.outputs = tuple(self.outputs[-3:]), []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _teacher_forward(teacher: Teacher, batch: Batch, layers: tuple[int, ...], capture: _QKVCapture) -> Targets:
    states = teacher.hidden_states(batch.input_ids, batch.attention_mask)
    qkv = capture.take()
    return Targets(
        states={layer: states[layer].float() for layer in layers},
        qkv=torch.cat(qkv, dim=-1).float() if qkv is not None else None,
    )


class _StatsAccumulator:
    def __init__(self, layers: tuple[int, ...], hidden: int):
        self.layers = layers
        self.sum = torch.zeros(len(layers), hidden, dtype=torch.float64)
        self.sumsq = torch.zeros(len(layers), hidden, dtype=torch.float64)
        self.count = 0

    def add(self, targets: Targets, mask: torch.Tensor) -> None:
        m = mask.bool()
        for k, layer in enumerate(self.layers):
            x = targets.states[layer][m].double()
            self.sum[k] += x.sum(0)
            self.sumsq[k] += (x * x).sum(0)
        self.count += int(m.sum())

    def result(self) -> LayerStats:
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0)
        std = var.sqrt()
        # A near-constant dimension would have its noise amplified without bound.
        std = torch.maximum(std, 1e-2 * std.mean(dim=1, keepdim=True))
        return LayerStats(self.layers, mean.float(), std.float())


def compute_stats(teacher: Teacher, batches: list[Batch], layers: tuple[int, ...]) -> LayerStats:
    acc = _StatsAccumulator(layers, teacher.hidden)
    capture = _QKVCapture(teacher.model, None)
    for b in batches:
        acc.add(_teacher_forward(teacher, b, layers, capture), b.attention_mask)
    return acc.result()


class LiveTeacherStates:
    """Runs the teacher on every batch. ``stats`` default to the first ``stats_batches`` batches."""

    def __init__(
        self,
        teacher: Teacher,
        layers: tuple[int, ...],
        relation_layer: int | None = None,
        stats: LayerStats | None = None,
    ):
        self.teacher = teacher
        self.n_layers, self.hidden = teacher.num_layers, teacher.hidden
        self.layers = tuple(layers)
        self.relation_layer = relation_layer
        self.stats = stats
        self.calls = 0
        self._capture = _QKVCapture(teacher.model, relation_layer)

    def targets(self, batch: Batch) -> Targets:
        self.calls += 1
        return _teacher_forward(self.teacher, batch, self.layers, self._capture)


class SourceTargets:
    """Teacher states whose pooled-term targets are, for a translated text, the teacher's
    embedding of its source sentence (Reimers & Gurevych 2020: "Making monolingual sentence
    embeddings multilingual using knowledge distillation"): the student learns to put a sentence
    and its translation where the teacher puts the original. Token-level targets stay the
    teacher's states of the text itself; texts without a source keep their own pooled target."""

    def __init__(self, states: TeacherStates, source_pooled: torch.Tensor, has_source: torch.Tensor):
        self.states = states
        self.n_layers, self.hidden, self.layers = states.n_layers, states.hidden, states.layers
        self.relation_layer, self.stats = states.relation_layer, states.stats
        self.source_pooled, self.has_source = source_pooled, has_source

    def targets(self, batch: Batch) -> Targets:
        return replace(self.states.targets(batch), source_pooled=self.source_pooled[batch.index],
                       has_source=self.has_source[batch.index])

    def __getattr__(self, name: str):
        if name == "states":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.states, name)  # a cache's path, key, nbytes


def teacher_pooled(teacher: Teacher, tokens: TokenizedTexts, pooling: str, batch_size: int, progress: Progress,
                   what: str) -> torch.Tensor:
    """[N, d] the teacher's pooled last-layer state of each text (pre-Dense, as the pooled term
    compares)."""
    pooled = torch.empty(len(tokens), teacher.hidden)
    with torch.no_grad():
        for b in track(length_bucketed_batches(tokens, batch_size, seed=0, shuffle=False), what, progress, "batch"):
            last = teacher.hidden_states(b.input_ids, b.attention_mask)[teacher.num_layers]
            pooled[b.index] = pool(last.float(), b.attention_mask, pooling)
    return pooled


def source_embeddings(teacher: Teacher, texts: list[str], sources: dict[str, str], max_length: int, pooling: str,
                      batch_size: int = 64, progress: Progress = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, d] the teacher's pooled last-layer state (pre-Dense, as the pooled term compares) of
    each text's source sentence, and [N] whether the text has one; rows without a source are
    zero and unused. Each distinct source is embedded once."""
    wanted = sorted({sources[t] for t in texts if t in sources})
    out = torch.zeros(len(texts), teacher.hidden)
    has = torch.tensor([t in sources for t in texts], dtype=torch.bool)
    if not wanted:
        return out, has
    pooled = teacher_pooled(teacher, tokenize(wanted, teacher.tokenizer, max_length), pooling, batch_size, progress,
                            "teacher embeds the translations' sources")
    row = {src: i for i, src in enumerate(wanted)}
    for i, t in enumerate(texts):
        if t in sources:
            out[i] = pooled[row[sources[t]]]
    return out, has


def pooled_only(weights: LossWeights) -> bool:
    """Whether the loss reads nothing but each text's pooled teacher embedding."""
    return weights.pooled_cosine > 0 and weights.hidden_mse == 0 and weights.attention_relation == 0


class PooledTeacherStates:
    """Teacher targets reduced to what the pooled term alone needs: each text's pooled embedding,
    a vector a text rather than a vector a token and layer (for mpnet-base at 30 tokens a text,
    1.5 KB a text in fp16 against 46 KB for the 6 layers an L3 student maps), computed in one
    teacher pass and kept as one fp16 ``.npy`` file under the cache folder."""

    relation_layer = None
    stats = None

    def __init__(self, pooled: torch.Tensor, n_layers: int, path: Path | None = None):
        self.pooled, self.n_layers, self.hidden = pooled, n_layers, pooled.shape[1]
        self.layers = (n_layers,)
        self.path = path

    def nbytes(self) -> int:
        return self.pooled.numel() * 2

    def targets(self, batch: Batch) -> Targets:
        return Targets({}, pooled=self.pooled[batch.index])

    @classmethod
    def build(cls, teacher: Teacher, tokens: TokenizedTexts, pooling: str, cache_root: Path | None,
              batch_size: int = 64, progress: Progress = True) -> PooledTeacherStates:
        key = hashlib.sha1(json.dumps([teacher.fingerprint, tokens.fingerprint, "pooled", pooling]).encode()).hexdigest()
        path = cache_root / f"pooled-{key[:16]}.npy" if cache_root is not None else None
        if path is not None and path.is_file():
            try:
                array = np.load(path, allow_pickle=False)
                if array.shape == (len(tokens), teacher.hidden):
                    return cls(torch.from_numpy(array.astype(np.float32)), teacher.num_layers, path)
            except (OSError, ValueError) as err:
                warnings.warn(f"teacher-state cache {path} is unusable ({err}); rebuilding it")
        pooled = teacher_pooled(teacher, tokens, pooling, batch_size, progress, f"teacher embeddings {key[:8]}")
        pooled = pooled.half().float()  # as stored: a run from the file trains exactly as this one
        if path is not None:
            check_free_space(cache_root, pooled.numel() * 2, _CACHE_SETTING)
            write_npy(path, pooled.numpy().astype(np.float16))
        return cls(pooled, teacher.num_layers, path)


class CachedTeacherStates:
    """Teacher states for one tokenised text set, computed once and kept as packed fp16 arrays.

    Only non-padding tokens are stored (row ``offsets[i]:offsets[i+1]`` of each array is text i),
    so the cache holds no padding and any batching of the texts can be served from it.
    """

    def __init__(self, meta: dict, arrays: dict[str, np.ndarray], stats: LayerStats, path: Path | None):
        self.meta = meta
        self.n_layers, self.hidden = meta["n_layers"], meta["hidden"]
        self.layers = tuple(meta["layers"])
        self.relation_layer = meta["relation_layer"]
        self.stats = stats
        self.path = path
        self._arrays = arrays
        self.offsets = torch.from_numpy(np.asarray(arrays["offsets"], dtype=np.int64))

    @property
    def key(self) -> str:
        return self.meta["key"]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays.values())

    def targets(self, batch: Batch) -> Targets:
        mask = batch.attention_mask.bool()
        starts = self.offsets[batch.index]
        lengths = mask.sum(1)
        # Row-major order of mask positions equals the concatenation of each text's token rows.
        rows = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.tolist(), lengths.tolist())]).numpy()

        def unpack(name: str, width: int) -> torch.Tensor:
            out = torch.zeros(*mask.shape, width)
            out[mask] = torch.from_numpy(np.asarray(self._arrays[name][rows], dtype=np.float32))
            return out

        states = {layer: unpack(f"layer_{layer}", self.hidden) for layer in self.layers}
        qkv = unpack("qkv", 3 * self.hidden) if self.relation_layer is not None else None
        return Targets(states, qkv)

    # ---- building and loading

    @staticmethod
    def cache_key(teacher: Teacher, tokens: TokenizedTexts, layers, relation_layer) -> str:
        blob = json.dumps([teacher.fingerprint, tokens.fingerprint, list(layers), relation_layer])
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @classmethod
    def build(
        cls,
        teacher: Teacher,
        tokens: TokenizedTexts,
        layers: tuple[int, ...],
        relation_layer: int | None = None,
        cache_root: Path | None = None,
        batch_size: int = 64,
        progress: Progress = True,
        shared: SharedStates | None = None,
    ) -> CachedTeacherStates:
        """Run the teacher once over ``tokens``; reuse a finished cache under ``cache_root``,
        or one another machine published to ``shared`` (verified like a local one), and
        publish what is built here. Without ``cache_root`` the states stay in memory."""
        layers = tuple(sorted(set(layers)))
        key = cls.cache_key(teacher, tokens, layers, relation_layer)
        if cache_root is None:
            return cls(*_compute_states(teacher, tokens, layers, relation_layer, key, None, batch_size, progress), None)
        final = cache_root / key
        reused = cls._reuse(final, key, shared)
        if reused is not None:
            return reused
        widths = _array_widths(layers, teacher.hidden, relation_layer)
        tmp = _partial_cache_dir(final, key, sum(tokens.lengths) * sum(widths.values()) * 2 + (1 << 20))
        try:
            meta, arrays, stats = _compute_states(teacher, tokens, layers, relation_layer, key, tmp, batch_size,
                                                  progress)
            _finish_partial(tmp, meta, arrays, stats)
        except BaseException:
            discard_partial(tmp)
            raise
        return cls._commit(tmp, final, key, shared)

    @classmethod
    def _reuse(cls, final: Path, key: str, shared: SharedStates | None) -> CachedTeacherStates | None:
        """The verified cache at ``final``, fetched from ``shared`` first if only published there;
        None when there is none or it is unusable (then it is removed)."""
        if not (final / "meta.json").is_file() and shared is not None:
            shared.fetch(key, final)
        if not (final / "meta.json").is_file():
            return None
        try:
            states = cls.load(final)
            if shared is not None:
                shared.publish(key, final)
            return states
        except (CorruptCache, ValueError, OSError, KeyError, json.JSONDecodeError) as err:
            # Damaged or tampered with (a pickle planted as .npy fails here, unexecuted).
            warnings.warn(f"teacher-state cache {final} is unusable ({err}); rebuilding it")
            shutil.rmtree(final, ignore_errors=True)
            return None

    @classmethod
    def _commit(cls, tmp: Path, final: Path, key: str, shared: SharedStates | None) -> CachedTeacherStates:
        """Move the finished ``tmp`` into place as ``final``, load it and publish it to ``shared``."""
        try:
            commit_dir(tmp, final)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
        states = cls.load(final)
        if shared is not None:
            shared.publish(key, final)
        return states

    @classmethod
    def load(cls, path: Path, verify: bool = True) -> CachedTeacherStates:
        meta = json.loads((path / "meta.json").read_text())
        for name, digest in meta.get("sha256", {}).items() if verify else ():
            if sha256_file(path / name) != digest:
                raise CorruptCache(f"{path / name}: content does not match its recorded sha256")
        # Plain .npy arrays, memory-mapped; allow_pickle stays False (never unpickle storage).
        names = [f"layer_{l}" for l in meta["layers"]] + (["qkv"] if meta["relation_layer"] is not None else [])
        arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}
        arrays["offsets"] = np.load(path / "offsets.npy", allow_pickle=False)
        stats = LayerStats(
            tuple(meta["layers"]),
            torch.from_numpy(np.load(path / "stats_mean.npy", allow_pickle=False)),
            torch.from_numpy(np.load(path / "stats_std.npy", allow_pickle=False)),
        )
        return cls(meta, arrays, stats, path)


_CACHE_SETTING = "the teacher-state cache (paths.cache_dir)"


def _array_widths(layers: tuple[int, ...], hidden: int, relation_layer: int | None) -> dict[str, int]:
    """Name and width of each packed array of a teacher-state cache."""
    widths = {f"layer_{l}": hidden for l in layers}
    if relation_layer is not None:
        widths["qkv"] = 3 * hidden
    return widths


def _partial_cache_dir(final: Path, key: str, n_bytes: int) -> Path:
    """A marked temporary folder next to ``final``, once ``n_bytes`` are known to fit there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final.parent, f".{key}-")
    check_free_space(final.parent, n_bytes, _CACHE_SETTING)
    return partial_dir(final.parent, f".{key}-")


def _allocate(folder: Path | None, name: str, rows: int, width: int) -> np.ndarray:
    """A zeroed fp16 array: in memory, or a memory-mapped ``name``.npy in ``folder``."""
    if folder is None:
        return np.zeros((rows, width), dtype=np.float16)
    path = folder / f"{name}.npy"
    with disk_full_is_one_line(path, _CACHE_SETTING):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, width))
        # open_memmap leaves a sparse file: writing into it on a full device kills
        # the process with SIGBUS. Reserving the blocks now fails with ENOSPC instead.
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
    return array


def _compute_states(teacher: Teacher, tokens: TokenizedTexts, layers: tuple[int, ...], relation_layer: int | None,
                    key: str, folder: Path | None, batch_size: int,
                    progress: Progress) -> tuple[dict, dict[str, np.ndarray], LayerStats]:
    """Run the teacher over ``tokens`` into packed arrays (files in ``folder``, or memory when it is
    None); returns the cache's meta, its arrays (``offsets`` last) and the layer statistics."""
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(tokens.lengths)
    n_tok = sum(tokens.lengths)
    widths = _array_widths(layers, teacher.hidden, relation_layer)
    arrays = {name: _allocate(folder, name, n_tok, width) for name, width in widths.items()}
    acc = _StatsAccumulator(layers, teacher.hidden)
    capture = _QKVCapture(teacher.model, relation_layer)
    batches = length_bucketed_batches(tokens, batch_size, seed=0, shuffle=False)
    try:
        for b in track(batches, f"teacher states {key[:8]}", progress, "batch"):
            t = _teacher_forward(teacher, b, layers, capture)
            acc.add(t, b.attention_mask)
            m = b.attention_mask.bool()
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in b.index.tolist()])
            for l in layers:
                arrays[f"layer_{l}"][rows] = t.states[l][m].numpy().astype(np.float16)
            if t.qkv is not None:
                arrays["qkv"][rows] = t.qkv[m].numpy().astype(np.float16)
    finally:
        capture.close()
    meta = {
        "key": key,
        "teacher": teacher.name,
        "teacher_fingerprint": teacher.fingerprint,
        "tokens_fingerprint": tokens.fingerprint,
        "n_texts": len(tokens),
        "n_tokens": int(n_tok),
        "n_layers": teacher.num_layers,
        "hidden": teacher.hidden,
        "layers": list(layers),
        "relation_layer": relation_layer,
    }
    arrays["offsets"] = offsets
    return meta, arrays, acc.result()


def _finish_partial(tmp: Path, meta: dict, arrays: dict[str, np.ndarray], stats: LayerStats) -> None:
    """Write the rest of a computed cache into ``tmp``, checksummed, ``meta.json`` last."""
    with disk_full_is_one_line(tmp, _CACHE_SETTING):
        offsets = arrays.pop("offsets")
        for a in arrays.values():
            a.flush()
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "stats_mean.npy", stats.mean.numpy())
        np.save(tmp / "stats_std.npy", stats.std.numpy())
        meta["sha256"] = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.npy"))}
        # meta.json last: its presence marks a complete cache.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    # Unmap the files before their folder is renamed; the cache is read back through load().
    arrays.clear()


# --------------------------------------------------------------------------- the loss


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, heads: int,
                n_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """MiniLMv2 self-attention relation loss for one of Q, K or V.

    Both sides are split into the same number of relation heads (so student and teacher may have
    different widths and attention-head counts); relations are scaled dot products between the
    tokens of a text; the loss is KL(teacher || student) over keys, averaged over real query
    tokens and heads.
    """

    def log_relations(x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = x.view(b, t, heads, d // heads).transpose(1, 2)  # [B, R, T, d/R]
        scores = h @ h.transpose(-1, -2) / math.sqrt(d // heads)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        return F.log_softmax(scores, dim=-1)

    log_s, log_t = log_relations(student), log_relations(teacher)
    kl = (log_t.exp() * (log_t - log_s)).nan_to_num(0.0).sum(-1)  # [B, R, T]
    q = mask.to(kl.dtype)[:, None, :]
    return (kl * q).sum() / ((q.sum() if n_tokens is None else n_tokens) * heads)


class HiddenStateDistillLoss(nn.Module):
    """KD-NAS multi-layer hidden-state loss, with optional pooled-cosine and relation terms.

    A plain module (no logging, no config parsing) holding the learned projections; the trainer
    optimises it together with the student.
    """

    def __init__(
        self,
        d_student: int,
        d_teacher: int,
        mapping: list[tuple[int, ...]],
        weights: LossWeights,
        stats: LayerStats | None = None,
        relation_heads: int = 12,
        pooling: str = "mean",
    ):
        super().__init__()
        self.mapping = [tuple(m) for m in mapping]
        self.pooling = pooling  # the teacher's own sentence pooling: the pooled term targets its embedding
        self.d_teacher = d_teacher
        self.weights = weights
        self.relation_heads = relation_heads
        # One projection per student state, to all its teacher targets at once (concatenated).
        # Zero-initialised: the loss starts exactly at the "predict each dimension's mean"
        # baseline (1.0 on standardised targets) instead of above it, so even a short proxy
        # distillation shows learning as a loss below 1 (measured: 1.04 -> 0.89 after 16 steps).
        self.proj = nn.ModuleList(nn.Linear(d_student, d_teacher * len(m)) for m in self.mapping)
        for lin in self.proj:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.pool_proj = nn.Linear(d_student, d_teacher) if weights.pooled_cosine > 0 else None
        if weights.attention_relation > 0 and (d_student % relation_heads or d_teacher % relation_heads):
            raise KdnasError(
                f"distill.relation_heads = {relation_heads} must divide both student hidden "
                f"{d_student} and teacher hidden {d_teacher}"
            )
        self.stat_index = {layer: k for k, layer in enumerate(stats.layers)} if stats else {}
        if stats is not None:
            self.register_buffer("mean", stats.mean.clone(), persistent=False)
            self.register_buffer("std", stats.std.clone(), persistent=False)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for m in self.mapping for l in m}))

    def _standardise(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if not self.stat_index:
            return x
        k = self.stat_index[layer]
        return (x - self.mean[k]) / self.std[k]

    def forward(
        self,
        student_states: tuple[torch.Tensor, ...],
        targets: Targets,
        mask: torch.Tensor,
        student_qkv: tuple[torch.Tensor, ...] | None = None,
        norm: tuple[float, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``norm`` = (tokens, texts) of the whole batch when this call sees only a slice of it
        (data parallel): each term is then this slice's share of the whole batch's mean, so the
        shares summed over processes equal the loss one process computes on the whole batch."""
        if len(student_states) != len(self.mapping):
            raise KdnasError(f"loss expects {len(self.mapping)} student states, got {len(student_states)}")
        m = mask.to(student_states[0].dtype)
        n_tokens, n_texts = norm if norm is not None else (m.sum(), mask.shape[0])
        parts: dict[str, torch.Tensor] = {}
        total = student_states[0].new_zeros(())
        if self.weights.hidden_mse > 0:
            per_layer = []
            for proj, s, layers in zip(self.proj, student_states, self.mapping):
                pred = proj(s).unflatten(-1, (len(layers), self.d_teacher))  # [B, T, k, d]
                target = torch.stack([self._standardise(l, targets.states[l]) for l in layers], dim=2)
                se = (pred - target).pow(2).mean(dim=(-1, -2))  # [B, T]
                per_layer.append((se * m).sum() / n_tokens)
            parts["hidden_mse"] = torch.stack(per_layer).mean()
            total = total + self.weights.hidden_mse * parts["hidden_mse"]
        if self.pool_proj is not None:
            s_pool = self.pool_proj(pool(student_states[-1], mask, self.pooling))
            t_pool = targets.pooled if targets.pooled is not None else pool(targets.states[max(targets.states)], mask,
                                                                            self.pooling)
            if targets.has_source is not None:
                t_pool = torch.where(targets.has_source.unsqueeze(-1), targets.source_pooled, t_pool)
            parts["pooled_cosine"] = (1 - F.cosine_similarity(s_pool, t_pool, dim=-1)).sum() / n_texts
            total = total + self.weights.pooled_cosine * parts["pooled_cosine"]
        if self.weights.attention_relation > 0:
            if student_qkv is None or targets.qkv is None:
                raise KdnasError("attention_relation weight > 0 needs student and teacher Q/K/V states")
            t_qkv = targets.qkv.chunk(3, dim=-1)
            rel = [relation_kl(s, t, mask, self.relation_heads, n_tokens) for s, t in zip(student_qkv, t_qkv)]
            parts["attention_relation"] = torch.stack(rel).mean()
            total = total + self.weights.attention_relation * parts["attention_relation"]
        return total, {k: float(v.detach()) for k, v in parts.items()}


# --------------------------------------------------------------------------- the trainer


@dataclass
class DistillResult:
    initial_eval_loss: float | None
    final_eval_loss: float | None
    first_train_loss: float
    last_train_loss: float  # mean over the last 10 % of steps
    steps: int
    tokens_per_s: float
    seconds: float
    eval_parts: dict[str, float] = field(default_factory=dict)
    # (step, training loss), thinned to at most 200 points for logging.
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    # With held-out checks (budget.eval_every): (step, held-out loss) of each check, step 0 the
    # start; the step whose state the student ends with (0: what it inherited, no step improved
    # it); whether patience ran out before the schedule's end.
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    # The learned map of the pooled student state into the teacher's pooled space (when the
    # pooled-cosine term is on): the student's teacher-space layer at export. Not serialised.
    pooled_projection: nn.Linear | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(replace(self, pooled_projection=None))  # asdict would deep-copy the module
        del d["pooled_projection"]
        return d


def _evaluate(student, loss_fn, teacher_states, batches, capture) -> tuple[float, dict[str, float]]:
    was_training = student.training
    student.eval()
    loss_fn.eval()
    total, tokens, parts_sum = 0.0, 0, {}
    with torch.no_grad():
        for b in batches:
            loss, parts = _step_loss(student, loss_fn, teacher_states, b, capture)
            n = b.n_tokens
            total += float(loss) * n
            tokens += n
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * n
    student.train(was_training)
    loss_fn.train(was_training)
    return total / tokens, {k: v / tokens for k, v in parts_sum.items()}


def _step_loss(student, loss_fn, teacher_states: TeacherStates, batch: Batch, capture: _QKVCapture,
               norm: tuple[float, float] | None = None):
    targets = teacher_states.targets(batch)
    device = next(student.parameters()).device
    if device.type != "cpu":
        targets = targets.to(device)
        batch = Batch(batch.index, batch.input_ids.to(device), batch.attention_mask.to(device))
    out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return loss_fn(out.hidden_states, targets, batch.attention_mask, capture.take(), norm)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise KdnasError("distill.device = 'cuda' but torch sees no GPU (use 'auto' or 'cpu')")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


class DataParallel:
    """Data parallelism over an initialised ``torch.distributed`` group (torchrun: gloo on the
    CPU, NCCL on GPUs). Every process holds the whole model and every batch; each takes its slice
    of the rows of each batch, computes its share of the batch's loss (normalised by the whole
    batch's tokens and texts) and the gradients are summed: the update is the one a single
    process makes on the whole batch. Plain DistributedDataParallel averages per-process means,
    which differs when slices hold different numbers of tokens (they do: texts vary in length)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @staticmethod
    def active() -> DataParallel | None:
        import torch.distributed as dist

        return DataParallel() if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Batch) -> Batch:
        rows = slice(self.rank, None, self.world)
        return Batch(batch.index[rows], batch.input_ids[rows], batch.attention_mask[rows])

    def sum_gradients(self, params: list[torch.Tensor], loss: torch.Tensor) -> float:
        """All-reduce every gradient and the loss share in one flat buffer; returns the loss of
        the whole batch."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # Which parameters got a gradient anywhere: one the loss never reaches (the pooler) must
        # stay without one, as in a single process, or AdamW would decay it there and not here.
        has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype)
        flat = torch.cat([g.reshape(-1) for g in grads] + [has, loss.detach().reshape(1).to(grads[0].dtype)])
        self.dist.all_reduce(flat)
        offset, reached = 0, flat[-1 - len(params):-1]
        for i, (p, g) in enumerate(zip(params, grads)):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if reached[i] > 0 else None
            offset += n
        return float(flat[-1])


@dataclass
class _Trainer:
    """What set-up builds for one distillation and every training step uses."""

    student: nn.Module
    loss_fn: HiddenStateDistillLoss
    teacher_states: TeacherStates
    capture: _QKVCapture
    device: torch.device
    parallel: DataParallel | None
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    grad_clip: float
    best: _Best | None = None  # with held-out checks: the best state so far
    eval_every: int | None = None
    patience: int | None = None
    eval_states: TeacherStates | None = None
    eval_batches: list[Batch] | None = None

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint holds, by the names it stores them under."""
        best = {} if self.best is None else {"best_student": self.best.student, "best_heads": self.best.heads}
        return {"student": self.student, "heads": self.loss_fn, **best}

    def check(self, run: _RunState) -> None:
        """A held-out check at ``run.step``: a new best is kept, and patience is counted."""
        loss = _evaluate(self.student, self.loss_fn, self.eval_states, self.eval_batches, self.capture)[0]
        run.eval_curve.append([run.step, loss])
        if loss < run.best_loss:
            self.best.keep(self.student, self.loss_fn)
            run.best_step, run.stale_checks = run.step, 0
        else:
            run.stale_checks += 1
            run.stopped_early = self.patience is not None and run.stale_checks >= self.patience

    @property
    def main(self) -> bool:
        """Whether this process shows progress and writes checkpoints (one process of several does)."""
        return self.parallel is None or self.parallel.main


@dataclass
class _RunState:
    """Where training stands: all of it goes into a checkpoint, so a resumed run carries on from it."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    initial_eval_loss: float | None = None
    eval_curve: list[list] = field(default_factory=list)  # [step, held-out loss] of each check
    best_step: int = 0
    stale_checks: int = 0  # checks in a row without a new best
    stopped_early: bool = False

    @property
    def best_loss(self) -> float:
        return next(loss for step, loss in self.eval_curve if step == self.best_step)

    def info(self, total_steps: int) -> dict:
        return {"step": self.step, "total_steps": total_steps, "losses": self.losses, "tokens": self.tokens,
                "seconds": self.seconds, "initial_eval_loss": self.initial_eval_loss, "eval_curve": self.eval_curve,
                "best_step": self.best_step, "stale_checks": self.stale_checks, "stopped_early": self.stopped_early}


class _Best(nn.Module):
    """Copies of the student and its projection heads as they were at the best held-out check
    (a module, so a checkpoint saves and restores it with the rest)."""

    def __init__(self, student: nn.Module, heads: nn.Module):
        super().__init__()
        self.student, self.heads = copy.deepcopy(student), copy.deepcopy(heads)

    @torch.no_grad()
    def keep(self, student: nn.Module, heads: nn.Module) -> None:
        self.student.load_state_dict(student.state_dict())
        self.heads.load_state_dict(heads.state_dict())

    @torch.no_grad()
    def restore(self, student: nn.Module, heads: nn.Module) -> None:
        student.load_state_dict(self.student.state_dict())
        heads.load_state_dict(self.heads.state_dict())


def _check_targets(student: nn.Module, teacher_states: TeacherStates, batches: list[Batch],
                   cfg: DistillConfig) -> tuple[list[tuple[int, ...]], bool]:
    """The layer mapping and whether the relation loss is on, once ``teacher_states`` can serve both."""
    if not batches:
        raise KdnasError("distill: no training batches (is the split empty?)")
    mapping = layer_mapping(student.config.num_hidden_layers, teacher_states.n_layers, cfg.mapping)
    missing = {l for m in mapping for l in m} - set(teacher_states.layers) if cfg.weights.hidden_mse > 0 else set()
    if cfg.weights.pooled_cosine > 0:
        missing |= {teacher_states.n_layers} - set(teacher_states.layers)
    if missing:
        raise KdnasError(f"teacher states lack layers {sorted(missing)} needed by mapping {cfg.mapping!r}")
    relation = cfg.weights.attention_relation > 0
    if relation and teacher_states.relation_layer is None:
        raise KdnasError("distill.weights.attention_relation > 0 but teacher states were built without Q/K/V")
    return mapping, relation


def _optimiser(params: list[nn.Parameter], cfg: DistillConfig, budget: TrainBudget,
               n_batches: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """AdamW with linear warm-up and decay, and the number of steps the schedule spans."""
    lr = budget.lr or cfg.lr
    # The fused kernel updates all tensors in one pass: ~6x cheaper than the default per-tensor
    # loop on CPU, which matters because the vocabulary-sized embedding dominates the update.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    total_steps = budget.epochs * n_batches
    if budget.max_steps:
        total_steps = min(total_steps, budget.max_steps)
    warmup = max(1, int(cfg.warmup_frac * total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), total_steps


def _set_up(student: nn.Module, teacher_states: TeacherStates, cfg: DistillConfig, budget: TrainBudget,
            mapping: list[tuple[int, ...]], relation: bool, n_batches: int, seed: int, pooling: str = "mean") -> _Trainer:
    """Device, data parallelism, projection heads and loss, optimiser and schedule."""
    device = resolve_device(cfg.device)
    parallel = DataParallel.active()
    student.to(device)
    # Seeds the heads' initialisation here and dropout during training.
    seed_torch(seed)
    stats = teacher_states.stats if cfg.standardize_targets and cfg.weights.hidden_mse > 0 else None
    if cfg.standardize_targets and cfg.weights.hidden_mse > 0 and stats is None:
        raise KdnasError("distill.standardize_targets needs teacher-state statistics")
    loss_fn = HiddenStateDistillLoss(
        student.config.hidden_size, teacher_states.hidden, mapping, cfg.weights, stats, cfg.relation_heads, pooling
    ).to(device)
    capture = _QKVCapture(student, student.config.num_hidden_layers if relation else None)
    params = [p for p in list(student.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt, sched, total_steps = _optimiser(params, cfg, budget, n_batches)
    return _Trainer(student, loss_fn, teacher_states, capture, device, parallel, params, opt, sched, total_steps,
                    cfg.grad_clip)


def _resume(trainer: _Trainer, checkpoint: Path | None, checkpoint_every: int, eval_states: TeacherStates,
            eval_batches: list[Batch] | None) -> _RunState:
    """The state saved in ``checkpoint`` (modules, optimiser, schedule and RNG restored in place),
    or a fresh start with the held-out loss measured before training."""
    found = find_checkpoint(checkpoint) if checkpoint is not None and checkpoint_every > 0 else None
    try:
        info = load_checkpoint(found, trainer.modules, trainer.opt, trainer.sched) if found else {}
    except UnusableCheckpoint as err:  # damaged on disk: starting over loses only time
        warnings.warn(f"{err}; starting this distillation over")
        remove_checkpoint(checkpoint)
        info = {}
    if info and info.get("total_steps") != trainer.total_steps:
        raise KdnasError(f"{found}: checkpoint is for {info.get('total_steps')} steps, this run has "
                         f"{trainer.total_steps}; delete it to start over")
    if info:
        return _RunState(info.get("step", 0), list(info.get("losses", [])), info.get("tokens", 0),
                         info.get("seconds", 0.0), info["initial_eval_loss"], list(info.get("eval_curve", [])),
                         info.get("best_step", 0), info.get("stale_checks", 0), info.get("stopped_early", False))
    if not eval_batches:
        return _RunState()
    initial = _evaluate(trainer.student, trainer.loss_fn, eval_states, eval_batches, trainer.capture)[0]
    if trainer.best is not None:
        trainer.best.keep(trainer.student, trainer.loss_fn)
    return _RunState(initial_eval_loss=initial, eval_curve=[[0, initial]])


def _train_step(trainer: _Trainer, batch: Batch) -> float:
    """One optimiser step on ``batch``; returns the batch's training loss."""
    t = trainer
    t.opt.zero_grad(set_to_none=True)
    if t.parallel is None:
        loss, _ = _step_loss(t.student, t.loss_fn, t.teacher_states, batch, t.capture)
        loss.backward()
        value = float(loss.detach())
    else:
        part = t.parallel.shard(batch)
        loss = torch.zeros((), device=t.device)
        if len(part.index):  # a batch with fewer rows than processes leaves some idle
            loss, _ = _step_loss(t.student, t.loss_fn, t.teacher_states, part, t.capture,
                                 norm=(batch.n_tokens, len(batch.index)))
            loss.backward()
        value = t.parallel.sum_gradients(t.params, loss)
    torch.nn.utils.clip_grad_norm_(t.params, t.grad_clip)
    t.opt.step()
    t.sched.step()
    return value


def _train(trainer: _Trainer, run: _RunState, batches: list[Batch], seed: int,
           on_step: Callable[[int, float, float], None] | None, progress: Progress, checkpoint: Path | None,
           checkpoint_every: int) -> None:
    """Train from ``run.step`` to the end of the schedule, updating ``run`` and saving it with the
    model every ``checkpoint_every`` steps."""
    trainer.student.train()
    trainer.loss_fn.train()
    start = time.perf_counter() - run.seconds
    bar = Bar(trainer.total_steps, "distill", progress if trainer.main else False, "step", initial=run.step)
    try:
        while run.step < trainer.total_steps and not run.stopped_early:
            # Each epoch's batch order depends only on (seed, epoch): a resumed run continues
            # the same order from the middle of an epoch.
            epoch, pos = divmod(run.step, len(batches))
            order = list(range(len(batches)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            for i in order[pos:]:
                if run.step >= trainer.total_steps:
                    break
                value = _train_step(trainer, batches[i])
                if not math.isfinite(value):
                    raise KdnasError(f"distill: loss became {value} at step {run.step} (lower distill.lr?)")
                run.losses.append(value)
                run.tokens += batches[i].n_tokens
                run.step += 1
                bar.update(1, loss=value)
                if on_step is not None:
                    on_step(run.step, value, trainer.sched.get_last_lr()[0])
                if trainer.best is not None and run.step % trainer.eval_every == 0 and run.step < trainer.total_steps:
                    trainer.check(run)
                    if run.stopped_early:
                        break
                if (checkpoint is not None and checkpoint_every > 0 and run.step % checkpoint_every == 0
                        and run.step < trainer.total_steps and trainer.main):
                    run.seconds = time.perf_counter() - start
                    save_checkpoint(checkpoint, trainer.modules, trainer.opt, trainer.sched,
                                    run.info(trainer.total_steps))
        run.seconds = time.perf_counter() - start
    finally:
        bar.close()


def _result(run: _RunState, final: float | None, parts: dict[str, float]) -> DistillResult:
    tail = run.losses[-max(1, len(run.losses) // 10):]
    return DistillResult(
        initial_eval_loss=run.initial_eval_loss,
        final_eval_loss=final,
        first_train_loss=run.losses[0],
        last_train_loss=sum(tail) / len(tail),
        steps=len(run.losses),
        tokens_per_s=run.tokens / run.seconds if run.seconds > 0 else float("inf"),
        seconds=run.seconds,
        eval_parts=parts,
        loss_curve=[(i + 1, run.losses[i]) for i in range(0, len(run.losses), max(1, len(run.losses) // 200))],
        eval_curve=[(int(step), float(loss)) for step, loss in run.eval_curve],
        best_step=run.best_step if run.eval_curve else None,
        stopped_early=run.stopped_early,
    )


def distill(
    student: nn.Module,
    teacher_states: TeacherStates,
    batches: list[Batch],
    cfg: DistillConfig,
    budget: TrainBudget,
    *,
    eval_batches: list[Batch] | None = None,
    eval_states: TeacherStates | None = None,
    seed: int = 0,
    on_step: Callable[[int, float, float], None] | None = None,
    progress: Progress = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    init_heads: Callable[[nn.Module], None] | None = None,
    pooling: str = "mean",
) -> DistillResult:
    """Distil ``student`` in place; returns a small, serialisable summary.

    ``pooling`` is the teacher's sentence pooling (mean, cls or max), used by the pooled term.
    ``init_heads`` starts the loss's projection heads (default: at zero); a teacher-initialised
    student starts them as its selection of the teacher's dimensions.

    ``eval_batches`` (served by ``eval_states``, default ``teacher_states``) measure the
    held-out KD loss before and after training, with the same standardisation statistics.
    With ``checkpoint`` and ``checkpoint_every`` > 0, the whole training state (weights,
    projection heads, optimiser moments, scheduler, RNG, losses) is saved every that many steps
    and a rerun resumes from it, ending where an uninterrupted run would.
    """
    mapping, relation = _check_targets(student, teacher_states, batches, cfg)
    trainer = _set_up(student, teacher_states, cfg, budget, mapping, relation, len(batches), seed, pooling)
    if init_heads is not None:  # before resuming: a checkpoint's heads replace these
        init_heads(trainer.loss_fn)
    eval_states = eval_states or teacher_states
    if budget.eval_every and eval_batches:
        trainer.best = _Best(student, trainer.loss_fn)
        trainer.eval_every, trainer.patience = budget.eval_every, budget.patience
        trainer.eval_states, trainer.eval_batches = eval_states, eval_batches
    run = _resume(trainer, checkpoint, checkpoint_every, eval_states, eval_batches)
    _train(trainer, run, batches, seed, on_step, progress, checkpoint, checkpoint_every)
    if eval_batches:
        final, parts = _evaluate(student, trainer.loss_fn, eval_states, eval_batches, trainer.capture)
        if trainer.best is not None:
            run.eval_curve.append([run.step, final])
            if final < run.best_loss:
                run.best_step = run.step
            else:  # the end is no better than the best check (perhaps the start): back to it
                trainer.best.restore(student, trainer.loss_fn)
                final, parts = _evaluate(student, trainer.loss_fn, eval_states, eval_batches, trainer.capture)
    else:
        final, parts = None, {}
    trainer.capture.close()
    student.to("cpu")  # saving, ONNX export and evaluation work on the CPU copy
    result = _result(run, final, parts)
    if trainer.loss_fn.pool_proj is not None:
        result.pooled_projection = trainer.loss_fn.pool_proj.to("cpu")
    return result


def cache_bytes(n_tokens: int, layers: tuple[int, ...], hidden: int, relation_layer: int | None) -> int:
    """What cached teacher states of ``n_tokens`` tokens take on disk: fp16, one row per token."""
    return n_tokens * sum(_array_widths(tuple(layers), hidden, relation_layer).values()) * 2


def cache_plan(cfg: DistillConfig, passes: float, n_tokens: int, layers: tuple[int, ...], hidden: int,
               relation_layer: int | None) -> tuple[bool, str | None]:
    """Whether to cache the teacher's states for texts seen ``passes`` times, and a one-line
    notice when "auto" runs the teacher live because the cache would pass distill.cache_max_gb.
    A forced cache over the bound is a ConfigError (the line says needed vs allowed)."""
    wanted = cfg.teacher_states == "cache" or (cfg.teacher_states == "auto" and passes > 1)
    need = cache_bytes(n_tokens, layers, hidden, relation_layer) / 1e9
    if not wanted or need <= cfg.cache_max_gb:
        return wanted, None
    what = (f"teacher states of {n_tokens:,} tokens x {len(layers)} layers x {hidden} need {need:.1f} GB, more "
            f"than distill.cache_max_gb = {cfg.cache_max_gb:g}")
    if cfg.teacher_states == "cache":
        raise ConfigError(f"{what}; raise it, or set distill.teacher_states: live (or auto)")
    return False, f"{what}: the teacher runs live on every batch instead"


def make_teacher_states(
    teacher: Teacher,
    tokens: TokenizedTexts,
    layers: tuple[int, ...],
    cfg: DistillConfig,
    cache_root: Path | None,
    passes: int,
    stats_batches: list[Batch] | None = None,
    progress: Progress = True,
    shared: SharedStates | None = None,
    pooling: str = "mean",
) -> TeacherStates:
    """Cached states when the texts are seen more than once (or when asked) and fit
    distill.cache_max_gb, live otherwise; only each text's pooled embedding when that is all the
    loss reads."""
    if pooled_only(cfg.weights):
        return PooledTeacherStates.build(teacher, tokens, pooling, cache_root if cfg.cache_on_disk else None,
                                         progress=progress)
    relation_layer = teacher.num_layers if cfg.weights.attention_relation > 0 else None
    use_cache, notice = cache_plan(cfg, passes, sum(tokens.lengths), tuple(sorted(set(layers))), teacher.hidden,
                                   relation_layer)
    if notice:
        warnings.warn(notice)
    if use_cache:
        root = cache_root if cfg.cache_on_disk else None
        return CachedTeacherStates.build(teacher, tokens, layers, relation_layer, root, progress=progress,
                                         shared=shared if root is not None else None)
    stats = compute_stats(teacher, stats_batches or [], layers) if cfg.standardize_targets and stats_batches else None
    return LiveTeacherStates(teacher, layers, relation_layer, stats)
