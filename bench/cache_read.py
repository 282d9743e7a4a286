"""Benchmark: reading a batch's teacher targets from a teacher-state cache on disk, by page faults
on its memory map against one read per text (what ``CachedTeacherStates.targets`` does).

    python -m bench.cache_read --cache ~/.cache/kdnas/teacher_states/<key> [--batches 100]
    python -m bench.cache_read --smoke     # a tiny random teacher's cache: correctness only

Batches of ``--batch`` texts drawn at random from the cache (as a shuffled epoch of
length-bucketed batches reads it), every mapped layer of each; the two ways take turns batch by
batch, each on batches of its own (a batch read twice would come from memory the second time).
Reported per batch: seconds, and MB the process read from the device (/proc/self/io read_bytes,
where the kernel reports it). The two differ only once the cache no longer fits in the page cache:
the report gives the cache's size beside the machine's memory.
"""

from __future__ import annotations

from bench.common import RUNS_BENCH, add_common_args, argv_of, header, out_folder, publish, smoke_config

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from kdnas_core.config import config_from_dict  # noqa: E402
from kdnas_core.distill import CachedTeacherStates  # noqa: E402
from kdnas_core.workspace import Workspace  # noqa: E402


def device_read_bytes() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def by_page_faults(cache: CachedTeacherStates, name: str, runs: list[tuple[int, int]]) -> np.ndarray:
    rows = np.concatenate([np.arange(s, s + n) for s, n in runs])
    return np.asarray(cache._arrays[name][rows], dtype=np.float32)


def by_reads(cache: CachedTeacherStates, name: str, runs: list[tuple[int, int]]) -> np.ndarray:
    return cache._rows(name, runs).astype(np.float32)


WAYS = {"memory map, page faults": by_page_faults, "one read per text (kdnas)": by_reads}


def measure(cache: CachedTeacherStates, batches: int, batch: int, seed: int) -> list[dict]:
    offsets = cache.offsets.numpy()
    n_texts = len(offsets) - 1
    names = [f"layer_{l}" for l in cache.layers]
    rng = random.Random(seed)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    read: dict[str, list[int]] = {w: [] for w in WAYS}
    for _ in range(batches):
        for way, fn in WAYS.items():
            texts = rng.sample(range(n_texts), min(batch, n_texts))
            runs = [(int(offsets[i]), int(offsets[i + 1] - offsets[i])) for i in texts]
            r0, t0 = device_read_bytes(), time.perf_counter()
            got = [fn(cache, name, runs) for name in names]
            times[way].append(time.perf_counter() - t0)
            if r0 is not None:
                read[way].append(device_read_bytes() - r0)
            assert all(g.shape[0] == sum(n for _, n in runs) for g in got)
    base = statistics.mean(times["memory map, page faults"])
    return [{"way": w, "s_per_batch": statistics.mean(times[w]), "speedup": base / statistics.mean(times[w]),
             "mb_read_per_batch": statistics.mean(read[w]) / 1e6 if read[w] else float("nan")} for w in WAYS]


def smoke_cache(out: Path) -> Path:
    cfg = config_from_dict(smoke_config(out / "work"), "smoke")
    ws = Workspace.prepare(cfg)
    return ws.cached_states("train", ws.layers_for([2]), progress=False).path


def main(argv: list[str] | None = None) -> Path:
    argv = argv_of(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None, help="a finished teacher-state cache folder (has meta.json)")
    p.add_argument("--batches", type=int, default=None, help="batches per way (default 100; --smoke 5)")
    p.add_argument("--batch", type=int, default=32, help="texts per batch (default 32, the benchmark config's)")
    add_common_args(p, RUNS_BENCH, "a tiny random teacher's cache")
    args = p.parse_args(argv)
    args.out = out_folder(args.out, args.smoke, RUNS_BENCH)
    if args.smoke:
        args.cache, args.batches = smoke_cache(args.out), args.batches or 5
    elif args.cache is None or not (args.cache / "meta.json").is_file():
        p.error(f"--cache {args.cache}: expected a finished teacher-state cache folder (with meta.json)")
    cache = CachedTeacherStates.load(args.cache, verify=False)
    size_gb = cache.nbytes() / 1e9
    rows = measure(cache, args.batches or 100, args.batch, seed=0)
    lines = [
        *header("Teacher-state cache reads: page faults vs one read per text", __file__, argv), "",
        f"- cache: {args.cache.name}, {cache.meta['n_texts']:,} texts, {len(cache.layers)} layers x "
        f"{cache.hidden}, {size_gb:.1f} GB on disk; {args.batches or 100} random batches of {args.batch} texts per way, "
        "the ways taking turns",
        "",
        "| way | s per batch | speed-up | MB read from the device per batch |",
        "|---|---:|---:|---:|",
        *[f"| {r['way']} | {r['s_per_batch']:.4f} | {r['speedup']:.2f}x | {r['mb_read_per_batch']:.1f} |" for r in rows],
        "",
    ]
    return publish("\n".join(lines), args.out / "cache_read.md")


if __name__ == "__main__":
    main()
