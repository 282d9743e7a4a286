"""Inference latency: ONNX export, ONNX Runtime and PyTorch timing, int8, analytic cost, predictor.

Latency is a measured number, not a proxy: each student is exported to ONNX and timed in ONNX
Runtime on the CPU with fixed thread counts (what users deploy), after warm-up, over a grid of
(batch, sequence length) shapes. Noisy measurements (coefficient of variation above a threshold)
are repeated. The predictor, fitted on measured architectures, lets the controller score large
pools cheaply; a measured value always wins over a predicted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from kdnas_core.files.atomic import temporary_sibling, user_permissions, write_json
from kdnas_core.config import LatencyConfig
from kdnas_core.errors import KdnasError
from kdnas_core.progress import Progress, track
from kdnas_core.search.space import StudentArch
from kdnas_core.sentence import SentenceEncoder

BACKENDS = ("ort-fp32", "ort-int8", "torch", "cuda")


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    cv: float  # standard deviation / mean
    runs: int
    noisy: bool
    attempts: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(times_s: Sequence[float], cv_threshold: float, attempts: int = 1) -> LatencyStats:
    """Statistics of one series of timings (seconds in, milliseconds out)."""
    if len(times_s) == 0:
        raise KdnasError("latency: no timings to summarise (latency.runs must be > 0)")
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    cv = float(ms.std(ddof=1) / mean) if len(ms) > 1 and mean > 0 else 0.0
    return LatencyStats(
        median_ms=float(np.median(ms)),
        # Nearest-rank p90: an observed timing, never an interpolation between two.
        p90_ms=float(np.sort(ms)[max(0, math.ceil(0.9 * len(ms)) - 1)]),
        min_ms=float(ms.min()),
        mean_ms=mean,
        cv=cv,
        runs=len(ms),
        noisy=cv > cv_threshold,
        attempts=attempts,
    )


def wall_timer(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    start = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def cuda_timer(fn: Callable[[], object]) -> float:
    """GPU time between two CUDA events around ``fn`` (host launch overhead excluded)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(
    fn: Callable[[], object],
    warmup: int,
    runs: int,
    cv_threshold: float,
    max_attempts: int,
    sync: Callable[[], None] | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> LatencyStats:
    """Time ``fn`` ``runs`` times after ``warmup`` calls; re-measure while noisy, keep the
    least noisy attempt. ``timer`` returns the seconds one call took (default: wall clock)."""
    if runs <= 0:
        raise KdnasError(f"latency.runs = {runs}: expected a positive number of timed runs")
    best: LatencyStats | None = None
    for attempt in range(1, max(1, max_attempts) + 1):
        for _ in range(warmup):
            fn()
        times = [timer(fn) if timer else wall_timer(fn, sync) for _ in range(runs)]
        stats = summarize(times, cv_threshold, attempt)
        if best is None or stats.cv < best.cv:
            best = stats
        if not stats.noisy:
            break
    assert best is not None
    return LatencyStats(**{**best.to_dict(), "attempts": attempt})


# --------------------------------------------------------------------------- export


class _EncoderForExport(nn.Module):
    """transformers 5 models take keyword arguments; the exporter passes positional ones."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def max_positions(model: nn.Module) -> int:
    n = model.config.max_position_embeddings
    # RoBERTa-style models (XLM-R) reserve padding_idx + 1 positions before the first token.
    if model.config.model_type in ("xlm-roberta", "roberta", "mpnet"):
        n -= (model.config.pad_token_id or 0) + 1
    return n


def check_grid(model: nn.Module, grid: Sequence[Sequence[int]]) -> None:
    limit = max_positions(model)
    for batch, seq in grid:
        if batch <= 0 or seq <= 0:
            raise KdnasError(f"latency.grid: ({batch}, {seq}) must be positive (batch, sequence length)")
        if seq > limit:
            raise KdnasError(
                f"latency.grid: sequence length {seq} exceeds the model's {limit} usable positions"
            )


def example_inputs(model: nn.Module, batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Ids above the special tokens: timing does not depend on which tokens, only on the shape.
    ids = torch.randint(100, model.config.vocab_size, (batch, seq), generator=g)
    return ids, torch.ones(batch, seq, dtype=torch.long)


# torch.onnx's TorchScript exporter keeps global state (GLOBALS.in_onnx_export), and
# warnings.catch_warnings is process-wide: two exports on two threads (search.max_parallel > 1)
# crashed each other, so exports in one process take turns. Quantisation takes the same turns:
# it lowers the root logger's level, and two overlapping ones left it lowered for good.
_EXPORT_LOCK = threading.Lock()


def export_onnx(model: nn.Module, path: Path, opset: int = 17) -> Path:
    """Export with dynamic batch and sequence axes; written next to ``path`` and renamed.
    Inputs ``input_ids`` and ``attention_mask`` (int64); output ``sentence_embedding`` [batch, dim]
    for a ``SentenceEncoder``, else ``last_hidden_state`` [batch, sequence, hidden]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    ids, mask = example_inputs(model, 2, 16)
    tmp = temporary_sibling(path)  # one per writer: two processes may export one student
    try:
        # The tracer warns about shape-dependent Python branches in transformers' masking code;
        # they are benign here (tests check outputs at other batch sizes and lengths).
        # A SentenceEncoder exports its finished sentence embedding; a bare encoder its states.
        sentence = isinstance(model, SentenceEncoder)
        output = "sentence_embedding" if sentence else "last_hidden_state"
        with _EXPORT_LOCK, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model if sentence else _EncoderForExport(model), (ids, mask), str(tmp),
                input_names=["input_ids", "attention_mask"], output_names=[output],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    output: {0: "batch"} if sentence else {0: "batch", 1: "sequence"},
                },
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
        user_permissions(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return path


def quantize_onnx(src: Path, dst: Path, mode: str = "dynamic-int8") -> Path:
    """Dynamic int8 quantisation of weights (activations quantised on the fly at run time)."""
    if mode != "dynamic-int8":
        raise KdnasError(f"quantisation mode {mode!r} is not supported; expected 'dynamic-int8'")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    tmp = temporary_sibling(dst)
    root = logging.getLogger()
    try:
        with _EXPORT_LOCK:
            level = root.level
            root.setLevel(logging.ERROR)  # ORT's advice to pre-process is for static quantisation
            try:
                quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
        user_permissions(tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def ort_session(path: Path, intra_threads: int, inter_threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_threads
    opts.inter_op_num_threads = inter_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- profiling


@dataclass
class LatencyReport:
    """Latency per backend and shape: ``results[backend]["BxS"] = LatencyStats``."""

    results: dict[str, dict[str, LatencyStats]] = field(default_factory=dict)
    hardware: str = ""

    def median(self, backend: str, batch: int, seq: int) -> float:
        return self.results[backend][f"{batch}x{seq}"].median_ms

    def to_dict(self) -> dict:
        return {
            "hardware": self.hardware,
            "results": {b: {k: s.to_dict() for k, s in r.items()} for b, r in self.results.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyReport:
        return cls(
            {b: {k: LatencyStats(**s) for k, s in r.items()} for b, r in data["results"].items()},
            data.get("hardware", ""),
        )


_THREADS_LOCK = threading.Lock()
_threads_users = 0
_threads_before: int | None = None


@contextmanager
def _torch_threads(n: int):
    """torch's thread count set to ``n`` while any caller is inside. The count is one setting
    for the whole process: each caller restoring what it saw on entry left it at ``n`` for good
    when two candidates were timed on two threads (search.max_parallel), so the first caller in
    saves it and the last one out restores it."""
    global _threads_users, _threads_before
    with _THREADS_LOCK:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
        _threads_users += 1
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before)


def profile_model(model: nn.Module, cfg: LatencyConfig, workdir: Path | None = None,
                  progress: Progress = False) -> LatencyReport:
    """Measure ``model`` on every configured backend and (batch, sequence) shape."""
    check_grid(model, cfg.grid)
    for b in cfg.backends:
        if b not in BACKENDS:
            raise KdnasError(f"latency.backends: {b!r} is not one of {', '.join(BACKENDS)}")
    report = LatencyReport(hardware=hardware_fingerprint(cfg))
    timing = dict(warmup=cfg.warmup, runs=cfg.runs, cv_threshold=cfg.cv_threshold, max_attempts=cfg.max_attempts)
    model.eval()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        onnx_fp32 = None
        for backend in track(cfg.backends, "latency", progress, "backend"):
            res: dict[str, LatencyStats] = {}
            if backend.startswith("ort"):
                if onnx_fp32 is None:
                    onnx_fp32 = export_onnx(model, Path(tmp) / "model.onnx", cfg.opset)
                path = onnx_fp32
                if backend == "ort-int8":
                    path = quantize_onnx(onnx_fp32, Path(tmp) / "model.int8.onnx")
                sess = ort_session(path, cfg.intra_op_threads, cfg.inter_op_threads)
                for batch, seq in cfg.grid:
                    ids, mask = example_inputs(model, batch, seq)
                    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                    res[f"{batch}x{seq}"] = measure(lambda: sess.run(None, feed), **timing)
            elif backend == "torch":
                with _torch_threads(cfg.intra_op_threads), torch.inference_mode():
                    for batch, seq in cfg.grid:
                        ids, mask = example_inputs(model, batch, seq)
                        res[f"{batch}x{seq}"] = measure(lambda: model(input_ids=ids, attention_mask=mask), **timing)
            elif backend == "cuda":
                if not torch.cuda.is_available():
                    continue  # nothing to measure on a CPU-only machine; the report says so by omission
                m = model.to("cuda")
                with torch.inference_mode():
                    for batch, seq in cfg.grid:
                        ids, mask = (t.to("cuda") for t in example_inputs(model, batch, seq))
                        res[f"{batch}x{seq}"] = measure(
                            lambda: m(input_ids=ids, attention_mask=mask), **timing, timer=cuda_timer
                        )
                model.to("cpu")
            report.results[backend] = res
    return report


def hardware_fingerprint(cfg: LatencyConfig) -> str:
    """CPU model, thread settings and runtime versions: latencies only transfer between equal ones."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [cpu, f"cores={os.cpu_count()}", f"intra={cfg.intra_op_threads}", f"inter={cfg.inter_op_threads}",
             f"ort={ort.__version__}", f"torch={torch.__version__}"]
    if "cuda" in cfg.backends and torch.cuda.is_available():
        # GPU latencies are reported next to CPU ones: they transfer only between equal GPUs.
        parts.append(f"gpu={torch.cuda.get_device_name(0)}")
    return " | ".join(parts)


def hardware_key(cfg: LatencyConfig) -> str:
    return hashlib.sha1(hardware_fingerprint(cfg).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- analytic cost


def count_params(arch: StudentArch, vocab: int, positions: int, type_vocab: int = 2, pooler: bool = True) -> dict[str, int]:
    """Parameters of the BERT student by component (matches ``count_parameters`` of the built model)."""
    h, f, n = arch.hidden, arch.ffn, arch.layers
    embeddings = (vocab + positions + type_vocab) * h + 2 * h
    attention = 4 * (h * h + h) + 2 * h  # Q, K, V, output projection, LayerNorm
    ffn = (h * f + f) + (f * h + h) + 2 * h
    out = {"embeddings": embeddings, "attention": n * attention, "ffn": n * ffn, "pooler": h * h + h if pooler else 0}
    out["encoder"] = out["attention"] + out["ffn"]
    out["total"] = embeddings + out["encoder"] + out["pooler"]
    return out


def count_flops(arch: StudentArch, batch: int, seq: int) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) of the encoder for one (batch, seq) input.

    Embedding look-ups, softmax, LayerNorm and activations are memory-bound and omitted; the
    latency predictor learns their cost through per-layer and per-token terms.
    """
    h, f, n, tokens = arch.hidden, arch.ffn, arch.layers, batch * seq
    projections = 2 * tokens * 4 * h * h  # Q, K, V, output
    scores = 2 * 2 * batch * seq * seq * h  # Q K^T and attention x V
    ffn = 2 * tokens * 2 * h * f
    return {
        "projections": n * projections,
        "attention_scores": n * scores,
        "ffn": n * ffn,
        "total": n * (projections + scores + ffn),
    }


# --------------------------------------------------------------------------- predictor

FEATURES = ("const", "layers", "layer_heads", "projection_gflop", "score_gflop", "ffn_gflop", "act_layers")


def features(arch: StudentArch, batch: int, seq: int) -> np.ndarray:
    """Cost terms a CPU's latency is close to linear in: a fixed overhead, per-layer and per-head
    kernel launches, and the FLOPs of each matrix-multiply family."""
    fl = count_flops(arch, batch, seq)
    return np.array([
        1.0,
        arch.layers,
        arch.layers * arch.heads,
        fl["projections"] / 1e9,
        fl["attention_scores"] / 1e9,
        fl["ffn"] / 1e9,
        # GELU is costlier than ReLU/SiLU per element; charge it per FFN activation element.
        arch.layers * batch * seq * arch.ffn / 1e6 * (arch.activation == "gelu"),
    ])


@dataclass
class LatencyPredictor:
    """Non-negative linear model of latency in the cost terms above, fitted for relative error.

    Non-negative coefficients keep it physically sensible (more work never predicts less time),
    which makes it extrapolate safely to unmeasured architectures.
    """

    coef: list[float]
    batch: int
    seq: int
    backend: str
    hardware: str = ""

    @classmethod
    def fit(cls, archs: Sequence[StudentArch], latencies_ms: Sequence[float], batch: int, seq: int,
            backend: str = "ort-fp32", hardware: str = "") -> LatencyPredictor:
        from scipy.optimize import nnls

        if len(archs) < 3 or len(archs) != len(latencies_ms):
            raise KdnasError(f"latency predictor needs >= 3 measured architectures, got {len(archs)}")
        y = np.asarray(latencies_ms, dtype=np.float64)
        X = np.stack([features(a, batch, seq) for a in archs])
        # Dividing each row by its latency makes the fit minimise relative error, so small
        # students (where budgets bite) are predicted as well as large ones.
        coef, _ = nnls(X / y[:, None], np.ones_like(y))
        return cls([float(c) for c in coef], batch, seq, backend, hardware)

    def predict(self, arch: StudentArch) -> float:
        return float(features(arch, self.batch, self.seq) @ np.asarray(self.coef))

    def predict_many(self, archs: Sequence[StudentArch]) -> np.ndarray:
        return np.array([self.predict(a) for a in archs])

    def save(self, path: Path) -> Path:
        return write_json(path, asdict(self) | {"features": list(FEATURES)})

    @classmethod
    def load(cls, path: Path) -> LatencyPredictor:
        data = json.loads(Path(path).read_text())
        if data.pop("features", list(FEATURES)) != list(FEATURES):
            raise KdnasError(f"{path}: latency predictor was fitted on other features; refit it")
        return cls(**data)


def predictor_path(cache_root: Path, cfg: LatencyConfig) -> Path:
    """Where this hardware's predictor for the reward's backend and shape lives: a later search
    on the same machine and settings reuses it."""
    b, s = cfg.reward_shape
    return Path(cache_root) / "latency" / hardware_key(cfg) / f"predictor-{cfg.reward_backend}-{b}x{s}.json"


def params_baseline(archs: Sequence[StudentArch], latencies_ms: Sequence[float], vocab: int = 30522,
                    positions: int = 512) -> Callable[[StudentArch], float]:
    """The naive alternative: latency linear in encoder parameter count."""
    x = np.array([count_params(a, vocab, positions)["encoder"] for a in archs], dtype=np.float64)
    slope, intercept = np.polyfit(x, np.asarray(latencies_ms, dtype=np.float64), 1)
    return lambda a: float(slope * count_params(a, vocab, positions)["encoder"] + intercept)


def predictor_error(pred: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation and median absolute percentage error."""
    from scipy.stats import spearmanr

    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    return {
        "spearman": float(spearmanr(pred, true).statistic),
        "mdape": float(np.median(np.abs(pred - true) / true)),
    }


def estimate(arch: StudentArch, measured: dict[str, float], predictor: LatencyPredictor | None) -> tuple[float, str]:
    """Latency of ``arch``: measured if we have it (by arch_id), else predicted."""
    if arch.arch_id in measured:
        return measured[arch.arch_id], "measured"
    if predictor is None:
        raise KdnasError(f"no latency measured for {arch.name} and no predictor fitted")
    return predictor.predict(arch), "predicted"

