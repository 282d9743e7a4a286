"""bench/common.py, the benchmarks' one prologue: fast (no model), part of the default suite."""

import os
import re

from bench import common
from kdnas_core.config import KDNASConfig


def test_importing_it_sets_the_offline_environment():
    for key in ("DO_NOT_TRACK", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_VERBOSITY", "PREFECT_HOME"):
        assert os.environ.get(key), key


def test_header_names_command_commit_config_machine_and_date():
    cfg = KDNASConfig()
    lines = common.header("A title", "/x/bench/latency.py", ["--smoke", "--out", "/tmp/a b"], cfg)
    text = "\n".join(lines)
    assert lines[0] == "# A title"
    assert "- command: `python -m bench.latency --smoke --out '/tmp/a b'`" in text  # a shell can run it as is
    assert re.search(r"^- commit: [0-9a-f]{7,}(\+dirty)?$", text, re.M)
    assert f"- config: {common.config_hash(cfg)} " in text
    assert re.search(r"^- machine: .+, \d+ cores visible, [\d.]+ GiB memory", text, re.M)
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", text, re.M)
    several = "\n".join(common.header("t", "bench/proxy_rank.py", [], {"teacher": cfg, "random": cfg}))
    assert f"teacher {common.config_hash(cfg)}, random {common.config_hash(cfg)}" in several
    assert "- config" not in "\n".join(common.header("t", "bench/search_efficiency.py", []))


def test_header_names_the_commit_the_run_started_from(monkeypatch):
    """A run that outlives a commit names the code that ran, then where the checkout moved."""
    now = common.git_commit()
    monkeypatch.setattr(common, "STARTED_AT", "0123abc")
    text = "\n".join(common.header("t", "bench/latency.py", []))
    assert f"- commit: 0123abc when the run started ({now} when the report was written)" in text


def test_config_hash_follows_the_settings():
    a, b = KDNASConfig(), KDNASConfig(seed=1)
    assert common.config_hash(a) == common.config_hash(KDNASConfig()) != common.config_hash(b)
    assert re.fullmatch(r"[0-9a-f]{12}", common.config_hash(a))


def test_out_folder(tmp_path):
    assert common.out_folder(tmp_path / "given", True, tmp_path / "default") == tmp_path / "given"
    assert common.out_folder(None, False, tmp_path / "default") == tmp_path / "default"
    smoke = common.out_folder(None, True, tmp_path / "default")
    assert smoke.is_dir() and smoke != tmp_path / "default" and "kdnas-bench-smoke" in smoke.name
    smoke.rmdir()
