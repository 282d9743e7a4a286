import random

import numpy as np
import onnxruntime as ort
import pytest
import torch

from kdnas_core.config import LatencyConfig, SearchSpaceConfig
from kdnas_core.errors import KdnasError
from kdnas_core.latency import (
    LatencyPredictor,
    count_flops,
    count_params,
    estimate,
    export_onnx,
    measure,
    params_baseline,
    predictor_error,
    profile_model,
    quantize_onnx,
    summarize,
)
from kdnas_core.search.space import SearchSpace, StudentArch
from kdnas_core.student import build_student, count_parameters

QUICK = LatencyConfig(grid=[(1, 16), (2, 8)], warmup=1, runs=3, backends=["ort-fp32", "ort-int8", "torch"])


def test_summary_statistics_from_given_timings():
    s = summarize([0.010, 0.012, 0.011, 0.013, 0.050, 0.010, 0.011, 0.012, 0.010, 0.011], cv_threshold=0.15)
    assert s.median_ms == pytest.approx(11.0)
    assert s.min_ms == pytest.approx(10.0)
    assert s.p90_ms == pytest.approx(13.0)  # 9th of 10 sorted timings
    assert s.mean_ms == pytest.approx(15.0)
    assert s.cv == pytest.approx(np.std([10, 12, 11, 13, 50, 10, 11, 12, 10, 11], ddof=1) / 15.0)
    assert s.noisy and s.runs == 10
    assert not summarize([0.01, 0.0101, 0.0099], cv_threshold=0.15).noisy


def test_noisy_measurements_are_repeated_up_to_the_limit():
    calls = []
    fake = iter([0.0, 1.0] * 100)

    def fn():
        calls.append(1)

    # A sync hook that sleeps unevenly makes every attempt noisy.
    import time

    stats = measure(fn, warmup=0, runs=4, cv_threshold=0.01, max_attempts=3, sync=lambda: time.sleep(next(fake) * 0.002))
    assert stats.attempts == 3 and stats.noisy and len(calls) == 12
    with pytest.raises(KdnasError, match="latency.runs"):
        measure(fn, warmup=0, runs=0, cv_threshold=0.1, max_attempts=1)


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_onnx_export_matches_pytorch(kind, tokenizer, tmp_path):
    from tests.conftest import tiny_teacher

    teacher = tiny_teacher(kind, tokenizer)
    student = build_student(StudentArch(2, 32, 4, 64), teacher).eval()
    for model in (teacher.model, student):
        path = export_onnx(model, tmp_path / f"{kind}-{type(model).__name__}.onnx")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        enc = tokenizer(["a longer sentence with several words", "short"], return_tensors="pt", padding=True)
        with torch.no_grad():
            ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        (out,) = sess.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})
        # other batch and length than at export: the axes are dynamic
        assert out.shape == tuple(ref.shape)
        assert np.abs(out - ref.numpy()).max() < 1e-4
        q = quantize_onnx(path, tmp_path / "q.onnx")
        qs = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
        (qout,) = qs.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})
        assert np.isfinite(qout).all()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_exports_on_two_threads_at_once_both_succeed(bert_teacher, tmp_path):
    """search.max_parallel > 1 profiles candidates on worker threads; torch's exporter has global
    state, and two overlapping exports used to fail with an error about GLOBALS.in_onnx_export."""
    from concurrent.futures import ThreadPoolExecutor

    models = [build_student(StudentArch(2, 32, 4, 64), bert_teacher) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda im: export_onnx(im[1], tmp_path / f"m{im[0]}.onnx"), enumerate(models)))
    for path in paths:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_profile_reports_every_backend_and_shape(bert_teacher, tmp_path):
    report = profile_model(build_student(StudentArch(2, 32, 4, 64), bert_teacher), QUICK, tmp_path)
    assert set(report.results) == {"ort-fp32", "ort-int8", "torch"}
    for res in report.results.values():
        assert set(res) == {"1x16", "2x8"}
        assert all(s.median_ms > 0 and s.min_ms <= s.median_ms <= s.p90_ms for s in res.values())
    assert report.from_dict(report.to_dict()).to_dict() == report.to_dict()
    assert "ort=" in report.hardware


@pytest.mark.parametrize(
    "cfg, match",
    [
        (LatencyConfig(grid=[(1, 600)]), "exceeds the model's 130 usable positions"),
        (LatencyConfig(grid=[(0, 8)]), "must be positive"),
    ],
)
def test_bad_latency_settings(bert_teacher, cfg, match):
    with pytest.raises(KdnasError, match=match):
        profile_model(bert_teacher.model, cfg)


def test_unknown_quantisation_mode(tmp_path):
    with pytest.raises(KdnasError, match="quantisation mode 'int4'"):
        quantize_onnx(tmp_path / "a.onnx", tmp_path / "b.onnx", mode="int4")


def test_unknown_backend_is_a_config_error():
    from kdnas_core.config import config_from_dict
    from kdnas_core.errors import ConfigError

    with pytest.raises(ConfigError, match="latency.backends.0"):
        config_from_dict({"latency": {"backends": ["tensorrt"]}})


@pytest.mark.parametrize("arch", ["L2-H32-A4-F64-gelu", "L3-H384-A6-F1536-relu", "L1-H96-A3-F200-silu"])
def test_analytic_params_match_the_built_model(arch, bert_teacher):
    a = StudentArch.from_name(arch)
    model = build_student(a, bert_teacher)
    c = model.config
    assert count_params(a, c.vocab_size, c.max_position_embeddings)["total"] == count_parameters(model)


def test_analytic_flops_match_a_hand_count():
    a = StudentArch(1, 4, 2, 8)
    fl = count_flops(a, batch=1, seq=3)
    assert fl["projections"] == 2 * 3 * 4 * 16
    assert fl["attention_scores"] == 2 * 2 * 9 * 4
    assert fl["ffn"] == 2 * 3 * 2 * 32
    assert fl["total"] == sum(v for k, v in fl.items() if k != "total")


def _synthetic_latency(a: StudentArch, rng: random.Random) -> float:
    """A CPU-like cost: overhead per layer and per head, FLOP-proportional matmuls, noise."""
    fl = count_flops(a, 1, 128)
    base = 0.3 + 0.15 * a.layers + 0.02 * a.layers * a.heads
    compute = 0.02 * fl["projections"] / 1e6 + 0.03 * fl["attention_scores"] / 1e6 + 0.018 * fl["ffn"] / 1e6
    return (base + compute) * rng.uniform(0.95, 1.05)


def test_predictor_beats_a_params_only_baseline_on_a_synthetic_grid(tmp_path):
    rng = random.Random(0)
    space = SearchSpace(SearchSpaceConfig())
    archs = list({space.sample(rng) for _ in range(60)})
    archs.sort()
    rng.shuffle(archs)
    lat = [_synthetic_latency(a, rng) for a in archs]
    train, test = archs[:20], archs[20:]
    pred = LatencyPredictor.fit(train, lat[:20], batch=1, seq=128)
    base = params_baseline(train, lat[:20])
    ours = predictor_error(pred.predict_many(test), lat[20:])
    naive = predictor_error([base(a) for a in test], lat[20:])
    assert ours["spearman"] > 0.95 and ours["mdape"] < 0.10
    assert ours["mdape"] < naive["mdape"] and ours["spearman"] > naive["spearman"]
    again = LatencyPredictor.load(pred.save(tmp_path / "p.json"))
    assert again.predict(test[0]) == pytest.approx(pred.predict(test[0]))
    measured = {test[0].arch_id: 1.23}
    assert estimate(test[0], measured, pred) == (1.23, "measured")
    assert estimate(test[1], measured, pred)[1] == "predicted"
    with pytest.raises(KdnasError, match=">= 3 measured"):
        LatencyPredictor.fit(train[:2], lat[:2], 1, 128)


def test_measure_uses_the_given_timer():
    seq = iter([0.010, 0.011, 0.009, 0.010])
    stats = measure(lambda: None, warmup=2, runs=4, cv_threshold=0.5, max_attempts=3, timer=lambda fn: (fn(), next(seq))[1])
    assert stats.attempts == 1 and stats.median_ms == pytest.approx(10.0) and stats.min_ms == pytest.approx(9.0)


def test_two_threads_timing_with_torch_leave_its_thread_count_as_it_was():
    """Each caller restored what it saw on entry, so two overlapping callers (the first in, then
    out first) left torch at 1 thread for the rest of the process."""
    import threading

    import torch

    from kdnas_core.latency import _torch_threads

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]

    def time_one(k):
        with _torch_threads(1):
            entered[k].set()
            leave[k].wait()

    workers = [threading.Thread(target=time_one, args=(k,)) for k in range(2)]
    try:
        workers[0].start()
        entered[0].wait()
        workers[1].start()
        entered[1].wait()
        for k in range(2):  # the first in leaves first
            leave[k].set()
            workers[k].join()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
