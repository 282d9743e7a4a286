"""What a student is distilled towards: the teacher's states of a batch, run live, read from one
pooled vector a text, or with translation pairs' sources as pooled targets; the statistics that
standardise them."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from kdnas_core.files.atomic import (
    adopt_stale_partial,
    check_free_space,
    discard_partial,
    partial_dir,
    remove_stale_partials,
    write_npy,
)
from kdnas_core.config import LossWeights
from kdnas_core.data import Batch, TokenizedTexts, length_bucketed_batches, tokenize
from kdnas_core.errors import KdnasError
from kdnas_core.progress import Progress, track
from kdnas_core.sentence import pool
from kdnas_core.teachers.loading import Teacher, find_qkv


_CACHE_SETTING = "the teacher-state cache (paths.cache_dir)"
# A teacher pass into the cache saves its progress every SAVE_EVERY batches (about 2-4 minutes of
# a base-size teacher on 2 cores), so a pass over 100k+ texts stopped part-way loses minutes, not
# the hour it took: the next build of the same cache resumes from the last save.
SAVE_EVERY = 100
PROGRESS = "progress.json"


def save_due(n_done: int, n_batches: int) -> bool:
    """Whether a pass that has finished ``n_done`` of ``n_batches`` batches saves its progress now."""
    return n_done % SAVE_EVERY == 0 and n_done < n_batches


def pass_folder(parent: Path, prefix: str, n_bytes: int) -> Path:
    """The marked folder under ``parent`` a teacher pass writes into: the one a stopped pass of the
    same cache left (its writer gone, its progress saved), else a new one once ``n_bytes`` are
    known to fit (the stale ones of dead writers removed first)."""
    adopted = adopt_stale_partial(parent, prefix, PROGRESS)
    if adopted is not None:
        return adopted
    Path(parent).mkdir(parents=True, exist_ok=True)
    remove_stale_partials(parent, prefix)
    check_free_space(parent, n_bytes, _CACHE_SETTING)
    return partial_dir(parent, prefix)


def save_progress(folder: Path, record: dict) -> None:
    """``record`` (what a stopped pass needs to resume) written last, by rename, once everything
    it counts is on disk."""
    (folder / f"{PROGRESS}.tmp").write_text(json.dumps(record))
    os.replace(folder / f"{PROGRESS}.tmp", folder / PROGRESS)


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
                   what: str, partial: Path | None = None) -> torch.Tensor:
    """[N, d] the teacher's pooled last-layer state of each text (pre-Dense, as the pooled term
    compares). With ``partial`` (a folder of this pass's own), the rows are written to a file there
    with the progress saved every SAVE_EVERY batches, and a pass stopped part-way resumes."""
    batches = length_bucketed_batches(tokens, batch_size, seed=0, shuffle=False)
    done, rows = 0, None
    if partial is not None:
        rows, done = _pooled_rows(partial, len(tokens), teacher.hidden, batch_size)
        pooled = torch.from_numpy(rows)  # writes land in the file
    else:
        pooled = torch.empty(len(tokens), teacher.hidden)
    what += f" (resumed at batch {done} of {len(batches)})" if done else ""
    with torch.no_grad():
        for n_done, b in enumerate(track(batches[done:], what, progress, "batch"), start=done + 1):
            last = teacher.hidden_states(b.input_ids, b.attention_mask)[teacher.num_layers]
            pooled[b.index] = pool(last.float(), b.attention_mask, pooling)
            if rows is not None and save_due(n_done, len(batches)):
                rows.flush()
                save_progress(partial, {"batch_size": batch_size, "shape": list(rows.shape), "done": n_done})
    return pooled.clone() if rows is not None else pooled


def _pooled_rows(folder: Path, n: int, d: int, batch_size: int) -> tuple[np.ndarray, int]:
    """The file of pooled rows in ``folder`` and how many batches of them a stopped pass saved; a
    new zeroed file and 0 when there is nothing usable to take up."""
    path = folder / "pooled.npy"
    try:
        record = json.loads((folder / PROGRESS).read_text())
        if record["batch_size"] == batch_size and record["shape"] == [n, d]:
            rows = np.load(path, mmap_mode="r+", allow_pickle=False)
            if rows.shape == (n, d) and rows.dtype == np.float32:
                return rows, int(record["done"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        pass
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d)), 0


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
        what = f"teacher embeddings {key[:8]}"
        if path is None:
            pooled = teacher_pooled(teacher, tokens, pooling, batch_size, progress, what)
        else:
            tmp = pass_folder(cache_root, f".pooled-{key[:16]}-", len(tokens) * teacher.hidden * 6)
            try:
                pooled = teacher_pooled(teacher, tokens, pooling, batch_size, progress, what, partial=tmp)
            except KeyboardInterrupt:
                raise  # kept with its progress: the next build of this cache resumes it
            except BaseException:
                discard_partial(tmp)
                raise
        pooled = pooled.half().float()  # as stored: a run from the file trains exactly as this one
        if path is not None:
            write_npy(path, pooled.numpy().astype(np.float16))
            discard_partial(tmp)
        return cls(pooled, teacher.num_layers, path)
