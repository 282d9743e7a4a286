"""The teacher-state cache: every text's mapped-layer states computed once, packed as fp16 arrays
(on disk, memory-mapped, or shared through a store), its size planned and bounded before any work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from kdnas_core.files.atomic import commit_dir, discard_partial, disk_full_is_one_line, sha256_file
from kdnas_core.config import DistillConfig
from kdnas_core.data import Batch, TokenizedTexts, length_bucketed_batches
from kdnas_core.errors import ConfigError
from kdnas_core.progress import Progress, track
from kdnas_core.sentence import pool
from kdnas_core.teachers.loading import Teacher

from kdnas_core.distill.targets import (
    _CACHE_SETTING,
    PROGRESS,
    CorruptCache,
    LayerStats,
    LiveTeacherStates,
    PooledTeacherStates,
    SharedStates,
    Targets,
    TeacherStates,
    _QKVCapture,
    _StatsAccumulator,
    _teacher_forward,
    compute_stats,
    pass_folder,
    pooled_only,
    save_due,
    save_progress,
)


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
        states = {layer: self._unpack(batch, f"layer_{layer}", self.hidden) for layer in self.layers}
        qkv = self._unpack(batch, "qkv", 3 * self.hidden) if self.relation_layer is not None else None
        return Targets(states, qkv)

    def layer(self, batch: Batch, layer: int) -> torch.Tensor:
        """[B, T, d] one cached teacher layer of ``batch``, without reading the others."""
        return self._unpack(batch, f"layer_{layer}", self.hidden)

    def _unpack(self, batch: Batch, name: str, width: int) -> torch.Tensor:
        mask = batch.attention_mask.bool()
        # Row-major order of mask positions equals the concatenation of each text's token rows.
        runs = list(zip(self.offsets[batch.index].tolist(), mask.sum(1).tolist()))
        out = torch.zeros(*mask.shape, width)
        out[mask] = torch.from_numpy(self._rows(name, runs).astype(np.float32))
        return out

    def _rows(self, name: str, runs: list[tuple[int, int]]) -> np.ndarray:
        """Rows ``start:start + n`` of array ``name`` for each (start, n) run, concatenated.

        A cache on disk is read with one read a run (a text's rows are contiguous). Indexing the
        memory map instead lets every page fault pull in the device's whole readahead window
        around it (8 MB on the benchmark box), about 20 times the bytes a step needs once the
        cache no longer fits in memory."""
        array = self._arrays[name]
        if self.path is None or not isinstance(array, np.memmap):
            return np.concatenate([array[s:s + n] for s, n in runs])
        row_bytes = array.shape[1] * array.dtype.itemsize
        out = np.empty((sum(n for _, n in runs), array.shape[1]), dtype=array.dtype)
        view, at = memoryview(out).cast("B"), 0
        with open(self.path / f"{name}.npy", "rb", buffering=0) as f:
            for start, n in runs:
                f.seek(array.offset + start * row_bytes)
                end = at + n * row_bytes
                while at < end:
                    got = f.readinto(view[at:end])
                    if not got:
                        raise CorruptCache(f"{self.path / f'{name}.npy'}: shorter than its offsets say")
                    at += got
        return out

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
        wider = cls._from_wider(cache_root, key, teacher, tokens, layers, relation_layer)
        if wider is not None:
            return wider
        widths = _array_widths(layers, teacher.hidden, relation_layer)
        # A pass stopped part-way (killed, or interrupted) is taken up where it saved its progress.
        tmp = pass_folder(cache_root, f".{key}-", sum(tokens.lengths) * sum(widths.values()) * 2 + (1 << 20))
        try:
            meta, arrays, stats = _compute_states(teacher, tokens, layers, relation_layer, key, tmp, batch_size,
                                                  progress)
            _finish_partial(tmp, meta, arrays, stats)
        except KeyboardInterrupt:
            raise  # kept with its progress: the next build of this cache resumes it
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
    def _from_wider(cls, root: Path, key: str, teacher: Teacher, tokens: TokenizedTexts, layers: tuple[int, ...],
                    relation_layer: int | None) -> CachedTeacherStates | None:
        """A finished cache under ``root`` of the same teacher and texts that holds every layer
        asked for, read as those layers only (and keyed as they are): a run that distils students
        reading every layer and students reading only the last runs the teacher once, not twice
        (about 25 minutes at 64,000 texts for a base-size teacher)."""
        for meta_path in sorted(root.glob("*/meta.json")):
            try:
                meta = json.loads(meta_path.read_text())
                fits = (meta["teacher_fingerprint"] == teacher.fingerprint
                        and meta["tokens_fingerprint"] == tokens.fingerprint
                        and set(layers) <= set(meta["layers"])
                        and relation_layer in (None, meta["relation_layer"]))
                if fits:
                    return cls.load(meta_path.parent, layers=layers, relation=relation_layer is not None, key=key)
            except (CorruptCache, ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
                # Not ours to remove: _reuse rebuilds a damaged cache when its own key asks for it.
                warnings.warn(f"teacher-state cache {meta_path.parent} is unusable ({err}); not reading from it")
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
    def load(cls, path: Path, verify: bool = True, layers: tuple[int, ...] | None = None, relation: bool = True,
             key: str | None = None) -> CachedTeacherStates:
        """The cache at ``path``; with ``layers``, only those of its layers (its qkv only with
        ``relation``), read, verified and keyed as ``key``: what a cache of just them would hold."""
        meta = json.loads((path / "meta.json").read_text())
        stored = list(meta["layers"])
        if layers is not None:
            missing = sorted(set(layers) - set(stored))
            if missing:
                raise ValueError(f"{path}: holds teacher layers {stored}, not {missing}")
            kept = sorted(set(layers))
            meta = {**meta, "layers": kept, "key": key or meta["key"],
                    "relation_layer": meta["relation_layer"] if relation else None}
        # Plain .npy arrays, memory-mapped; allow_pickle stays False (never unpickle storage).
        names = [f"layer_{l}" for l in meta["layers"]] + (["qkv"] if meta["relation_layer"] is not None else [])
        files = {f"{n}.npy" for n in [*names, "offsets", "stats_mean", "stats_std"]}
        for name, digest in meta.get("sha256", {}).items() if verify else ():
            if name in files and sha256_file(path / name) != digest:
                raise CorruptCache(f"{path / name}: content does not match its recorded sha256")
        arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}
        arrays["offsets"] = np.load(path / "offsets.npy", allow_pickle=False)
        rows = [stored.index(l) for l in meta["layers"]]  # statistics are per layer, in stored order
        stats = LayerStats(
            tuple(meta["layers"]),
            torch.from_numpy(np.load(path / "stats_mean.npy", allow_pickle=False)[rows]),
            torch.from_numpy(np.load(path / "stats_std.npy", allow_pickle=False)[rows]),
        )
        return cls(meta, arrays, stats, path)


def _array_widths(layers: tuple[int, ...], hidden: int, relation_layer: int | None) -> dict[str, int]:
    """Name and width of each packed array of a teacher-state cache."""
    widths = {f"layer_{l}": hidden for l in layers}
    if relation_layer is not None:
        widths["qkv"] = 3 * hidden
    return widths


def _allocate(folder: Path | None, name: str, rows: int, width: int, resume: bool = False) -> np.ndarray:
    """A zeroed fp16 array: in memory, or a memory-mapped ``name``.npy in ``folder`` (with
    ``resume``, the one a stopped pass left there, as it is)."""
    if folder is None:
        return np.zeros((rows, width), dtype=np.float16)
    path = folder / f"{name}.npy"
    if resume:
        array = np.load(path, mmap_mode="r+", allow_pickle=False)
        if array.shape != (rows, width) or array.dtype != np.float16:
            raise CorruptCache(f"{path}: {array.shape} {array.dtype}, expected ({rows}, {width}) float16")
        return array
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
    acc = _StatsAccumulator(layers, teacher.hidden)
    done = _load_progress(folder, key, batch_size, acc) if folder is not None else 0
    try:
        arrays = {name: _allocate(folder, name, n_tok, width, resume=done > 0) for name, width in widths.items()}
    except (OSError, ValueError, CorruptCache):  # what a stopped pass left is unusable: start over
        done, acc = 0, _StatsAccumulator(layers, teacher.hidden)
        arrays = {name: _allocate(folder, name, n_tok, width) for name, width in widths.items()}
    capture = _QKVCapture(teacher.model, relation_layer)
    batches = length_bucketed_batches(tokens, batch_size, seed=0, shuffle=False)
    desc = f"teacher states {key[:8]}" + (f" (resumed at batch {done} of {len(batches)})" if done else "")
    try:
        for n_done, b in enumerate(track(batches[done:], desc, progress, "batch"), start=done + 1):
            t = _teacher_forward(teacher, b, layers, capture)
            acc.add(t, b.attention_mask)
            m = b.attention_mask.bool()
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in b.index.tolist()])
            for l in layers:
                arrays[f"layer_{l}"][rows] = t.states[l][m].numpy().astype(np.float16)
            if t.qkv is not None:
                arrays["qkv"][rows] = t.qkv[m].numpy().astype(np.float16)
            if folder is not None and save_due(n_done, len(batches)):
                _save_progress(folder, key, batch_size, n_done, arrays, acc)
    finally:
        capture.close()
    if folder is not None:
        for name in (PROGRESS, f"{PROGRESS}.tmp", "progress_sum.npy", "progress_sumsq.npy"):
            (folder / name).unlink(missing_ok=True)
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


def _save_progress(folder: Path, key: str, batch_size: int, done: int, arrays: dict[str, np.ndarray],
                   acc: _StatsAccumulator) -> None:
    """The rows of the first ``done`` batches flushed to disk, then the statistics so far, then
    the count that says both are complete (written last, by rename)."""
    with disk_full_is_one_line(folder, _CACHE_SETTING):
        for a in arrays.values():
            a.flush()
        np.save(folder / "progress_sum.npy", acc.sum.numpy())
        np.save(folder / "progress_sumsq.npy", acc.sumsq.numpy())
        save_progress(folder, {"key": key, "batch_size": batch_size, "done": done, "count": acc.count})


def _load_progress(folder: Path, key: str, batch_size: int, acc: _StatsAccumulator) -> int:
    """Batches a stopped pass over the same texts finished in ``folder`` (their statistics loaded
    into ``acc``); 0 when there is nothing to take up."""
    try:
        record = json.loads((folder / PROGRESS).read_text())
        if record["key"] != key or record["batch_size"] != batch_size:
            return 0
        total = np.load(folder / "progress_sum.npy", allow_pickle=False)
        squares = np.load(folder / "progress_sumsq.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return 0
    if total.shape != tuple(acc.sum.shape) or squares.shape != tuple(acc.sumsq.shape):
        return 0
    acc.sum, acc.sumsq, acc.count = torch.from_numpy(total), torch.from_numpy(squares), int(record["count"])
    return int(record["done"])


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


def teacher_embeddings(states: TeacherStates, batches: list[Batch], pooling: str, progress: Progress = False
                       ) -> np.ndarray:
    """[N, d] each text's pooled last-layer teacher state, as the pooled term's target, read from
    ``states``: one layer of a cache, or one teacher pass over the texts when the states are live."""
    rows = max(int(b.index.max()) for b in batches) + 1
    out = np.zeros((rows, states.hidden), dtype=np.float32)
    last = states.n_layers
    for b in track(batches, "teacher embeddings for batching", progress, "batch"):
        if isinstance(getattr(states, "pooled", None), torch.Tensor):  # PooledTeacherStates
            vec = states.pooled[b.index]
        else:
            layer = getattr(states, "layer", None)
            top = layer(b, last) if layer is not None else states.targets(b).states[last]
            vec = pool(top, b.attention_mask, pooling)
        out[b.index.numpy()] = vec.float().numpy()
    return out
