"""Packaged evaluation sets: real rows from the installed Debian and PyPI packages, cached once."""

import pandas as pd
import pytest

from kdnas_core.evaluation import packaged
from kdnas_core.errors import DataError
from kdnas_core.evaluation.packaged import PACKAGED, PackagedDataMissing, clean_osis, load_packaged

BIBLES = ("bible-paraphrase", "bible-es-en")
slow_if_bible = {name: [pytest.mark.slow] if name in BIBLES else [] for name in PACKAGED}
ALL_SETS = [pytest.param(name, marks=slow_if_bible[name]) for name in PACKAGED]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module, so each set is extracted once (the Bibles take seconds)."""
    return tmp_path_factory.mktemp("packaged-cache")


@pytest.fixture(scope="module")
def loaded(shared_cache):
    frames = {}

    def load(name):
        if name not in frames:
            frames[name] = load_packaged(name, shared_cache)
        return frames[name]
    return load


def row_of(frame, column, text):
    rows = frame[frame[column] == text]
    assert len(rows) == 1, f"{text!r}: {len(rows)} rows"
    return rows.iloc[0]


# --------------------------------------------------------------------------- every set


@pytest.mark.parametrize("name", ALL_SETS)
def test_columns_and_texts(loaded, name):
    frame = loaded(name)
    assert tuple(frame.columns) == packaged.COLUMNS[PACKAGED[name].kind]
    for column in frame.columns:
        if column == "score":
            assert frame[column].dtype == "float64"
            continue
        texts = frame[column]
        assert texts.map(type).eq(str).all(), column
        assert (texts.str.strip() != "").all(), f"{name}.{column} has empty texts"
        if name in BIBLES:  # (chatbot answers about code may hold HTML)
            assert not texts.str.contains(r"<[^>]+>|¶|\b[HG]\d{4}\b").any(), f"{name}.{column} keeps markup"


@pytest.mark.parametrize("name", ALL_SETS)
def test_cached_as_versioned_csv_and_read_back(loaded, shared_cache, monkeypatch, name):
    first = loaded(name)
    path = shared_cache / "packaged" / f"{name}-v{PACKAGED[name].version}.csv"
    assert path.is_file()
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    def no_extraction():
        raise AssertionError("extracted again despite the cache")
    monkeypatch.setitem(packaged._EXTRACTORS, name, no_extraction)
    pd.testing.assert_frame_equal(load_packaged(name, shared_cache), first)


@pytest.mark.parametrize("name", ["chatterbot-qa", "chatterbot-topics", "lee-similarity"])
def test_two_extractions_give_the_same_rows(tmp_path, name):
    a = load_packaged(name, tmp_path / "a")
    b = load_packaged(name, tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)


def test_the_cache_file_is_what_is_read(tmp_path):
    load_packaged("lee-similarity", tmp_path)
    path = tmp_path / "packaged" / f"lee-similarity-v{PACKAGED['lee-similarity'].version}.csv"
    path.write_text("text1,text2,score\nNA,None,0.5\n")
    frame = load_packaged("lee-similarity", tmp_path)
    # Texts that pandas would read as missing values stay texts.
    assert frame.to_dict("records") == [{"text1": "NA", "text2": "None", "score": 0.5}]


def test_a_cache_file_with_other_columns_is_refused_in_one_line(tmp_path):
    path = tmp_path / "packaged" / f"chatterbot-qa-v{PACKAGED['chatterbot-qa'].version}.csv"
    path.parent.mkdir(parents=True)
    path.write_text("text,label\na,b\n")
    with pytest.raises(DataError) as err:
        load_packaged("chatterbot-qa", tmp_path)
    assert "\n" not in str(err.value) and "delete the file" in str(err.value)


def test_unknown_name_is_one_line_listing_the_known_sets(tmp_path):
    with pytest.raises(ValueError) as err:
        load_packaged("bible-klingon", tmp_path)
    message = str(err.value)
    assert "\n" not in message and "bible-klingon" in message
    assert all(name in message for name in PACKAGED)


def test_registry_entries_are_complete():
    for name, spec in PACKAGED.items():
        assert spec.name == name and spec.kind in packaged.COLUMNS
        for field in (spec.description, spec.licence, spec.origin, spec.install):
            assert field and "\n" not in field
        assert spec.install.startswith(("apt-get install ", "pip install "))
        assert name in packaged._EXTRACTORS


# --------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize("name, constant", [
    ("bible-paraphrase", "SWORD_DIR"),
    ("bible-es-en", "SWORD_DIR"),
    ("bible-paraphrase", "DIATHEKE"),
    ("chatterbot-qa", "CHATTERBOT_DATA"),
    ("chatterbot-topics", "CHATTERBOT_DATA"),
    ("lee-similarity", "GENSIM_TEST_DATA"),
    ("gettext-de", "LOCALE_DIR"),
])
def test_missing_package_names_the_install_command(tmp_path, monkeypatch, name, constant):
    nowhere = tmp_path / "not-installed"
    monkeypatch.setattr(packaged, constant, str(nowhere) if constant == "DIATHEKE" else nowhere)
    with pytest.raises(PackagedDataMissing) as err:
        load_packaged(name, tmp_path / "cache")
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "\n" not in message and name in message and message.endswith(PACKAGED[name].install)
    assert not (tmp_path / "cache" / "packaged").exists()


def test_not_installed_python_package_is_missing_too(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged, "GENSIM_TEST_DATA", None)
    with pytest.raises(PackagedDataMissing, match="pip install gensim"):
        load_packaged("lee-similarity", tmp_path)


# --------------------------------------------------------------------------- the Bibles


@pytest.mark.slow
def test_bible_paraphrase_pairs_kjv_with_web_verse_by_verse(loaded):
    frame = loaded("bible-paraphrase")
    assert len(frame) > 30_000
    first = frame.iloc[0]
    assert first["query"] == "In the beginning God created the heaven and the earth."
    # The WEB module glues these two words together ("Godcreated").
    assert first["positive"] == "In the beginning, God created the heavens and the earth."
    # Revelation 22:21 repeats 2 Thessalonians 3:18 in the KJV: the earlier verse keeps the text.
    assert frame.iloc[-1]["query"].startswith("He which testifieth these things saith, Surely I come quickly.")
    # The WEB module hangs its glossary on Revelation 22:21.
    assert not frame["positive"].str.contains("World English Bible").any()
    assert frame["query"].is_unique and frame["positive"].is_unique


@pytest.mark.slow
def test_bible_paraphrase_drops_psalm_titles(loaded):
    frame = loaded("bible-paraphrase")
    psalm_3_1 = row_of(frame, "query", "LORD, how are they increased that trouble me! many are they that rise up against me.")
    assert psalm_3_1["positive"] == "Yahweh, how my adversaries have increased! Many are those who rise up against me."
    for column in frame.columns:
        assert not frame[column].str.contains("Absalom his son").any()


@pytest.mark.slow
def test_bible_es_en_pairs_english_with_spanish(loaded):
    frame = loaded("bible-es-en")
    assert len(frame) > 29_000
    assert frame.iloc[0].tolist() == ["In the beginning God created the heaven and the earth.",
                                      "En el principio crió Dios los cielos y la tierra."]
    # RV1909 prints a chapter's first words in capitals, and a psalm's title inside verse 1.
    psalm_120_1 = row_of(frame, "query", "In my distress I cried unto the LORD, and he heard me.")
    assert psalm_120_1["positive"] == "A Jehová llamé estando en angustia, y él me respondió."
    assert not frame["positive"].str.startswith("Al Músico principal").any()
    # RV1909's Numbers 13 is numbered one verse off the KJV's: the chapter is left out.
    assert not frame["query"].str.startswith("Send thou men, that they may search the land of Canaan").any()
    assert frame["query"].is_unique and frame["positive"].is_unique


def test_clean_osis_keeps_words_apart_and_drops_headings():
    raw = ('<title canonical="true" type="psalm">A <w savlm="strong:H4210">Psalm</w></title> '
           '<lg sID="x"/><l level="1" sID="y"/>¶ <w savlm="strong:H0430">God</w><w>created</w>'
           '<l eID="y"/><l sID="z"/>the <transChange type="added">[but]</transChange> light .')
    assert clean_osis(raw) == "God created the but light."
    spanish = ('<w>sáca</w><transChange type="added">lo</transChange> <w>Porque</w>'
               '<transChange type="added">pasados</transChange><w>aún</w>')
    assert clean_osis(spanish) == "sácalo Porque pasados aún"
    web_end = 'saints. Amen. <div eID="g1" osisID="Rev" type="book"/> <div type="glossary"/> Abba is'
    assert clean_osis(web_end) == "saints. Amen."


# --------------------------------------------------------------------------- chatterbot, Lee


def test_chatterbot_qa_pairs_first_utterance_with_reply(loaded):
    frame = loaded("chatterbot-qa")
    assert 500 < len(frame) < 2_100
    ai = row_of(frame, "query", "What is AI?")
    assert ai["positive"].startswith("Artificial Intelligence is the branch of engineering and science")
    assert frame["query"].is_unique and frame["positive"].is_unique


def test_chatterbot_topics_labels_texts_by_topic_file(loaded):
    frame = loaded("chatterbot-topics")
    counts = frame["label"].value_counts()
    assert len(frame) > 1_000 and len(counts) >= 10 and counts.min() >= 20
    assert {"ai", "food", "money", "trivia"} <= set(counts.index)
    assert row_of(frame, "text", "What is AI?")["label"] == "ai"
    assert frame["text"].is_unique


def test_lee_similarity_has_every_pair_of_fifty_documents(loaded):
    frame = loaded("lee-similarity")
    assert len(frame) == 50 * 49 // 2
    assert frame["score"].between(0, 1).all() and frame["score"].nunique() > 20
    docs = pd.unique(pd.concat([frame["text1"], frame["text2"]]))
    assert len(docs) == 50
    assert frame.iloc[0]["text1"].startswith("The national executive of the strife-torn Democrats")


def test_gettext_sets_pair_english_messages_with_their_translations(loaded):
    de = loaded("gettext-de")
    assert len(de) > 1000
    # Program text never reaches the pairs: placeholders, accelerators, usage screens.
    for column in de.columns:
        assert not de[column].str.contains(r"%|\{|\t").any(), column
    assert not de["query"].str.startswith("-").any()
    assert (de["query"].str.split().str.len() >= 4).all()
    assert (de["query"] != de["positive"]).all()
    # Every language of the registry has a usable set; Japanese is written in its own script.
    ja = loaded("gettext-ja")
    assert len(ja) > 1000 and ja["positive"].str.contains(r"[\u3040-\u30ff\u4e00-\u9fff]").mean() > 0.9


def _write_mo(path, messages: dict[str, str]) -> None:
    """A GNU .mo catalogue (the format msgfmt writes), with a UTF-8 header entry."""
    import struct

    entries = {"": "Content-Type: text/plain; charset=UTF-8\n", **messages}
    keys = sorted(entries)
    ids, strs = [k.encode() for k in keys], [entries[k].encode() for k in keys]
    n, start = len(keys), 7 * 4
    key_start = start + 16 * n
    blob, key_offsets, value_offsets = b"", [], []
    for raw in ids:
        key_offsets.append((len(raw), key_start + len(blob)))
        blob += raw + b"\0"
    for raw in strs:
        value_offsets.append((len(raw), key_start + len(blob)))
        blob += raw + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, start, start + 8 * n, 0, key_start)
    table = b"".join(struct.pack("<2I", *o) for o in key_offsets + value_offsets)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + table + blob)


def test_training_messages_come_from_catalogues_the_evaluation_does_not_read(tmp_path, monkeypatch):
    from kdnas_core.config import DataConfig
    from kdnas_core.data import read_pairs, read_texts

    monkeypatch.setattr(packaged, "LOCALE_DIR", tmp_path)
    de, fr = tmp_path / "de" / "LC_MESSAGES", tmp_path / "fr" / "LC_MESSAGES"
    _write_mo(de / "coreutils.mo", {"cannot open the file for reading": "Datei kann nicht gelesen werden"})
    _write_mo(fr / "grep.mo", {"the window could not be shown": "la fenêtre n'a pas pu être affichée"})
    _write_mo(de / "gtk30.mo", {
        "Select a colour for the text": "Wählen Sie eine Farbe für den Text",
        "cannot open the file for reading": "Die Datei kann nicht geöffnet werden",  # its English is evaluated
        "The window could not be shown": "Das Fenster konnte nicht gezeigt werden",  # evaluated in French
        "Open %s": "%s öffnen",  # program text
        "Quit": "Beenden",  # a label
    })
    _write_mo(de / "iso_3166-1.mo", {"Federal Republic of Germany today": "Bundesrepublik Deutschland heute"})
    (de / "broken.mo").write_bytes(b"not a catalogue")
    texts = read_texts(DataConfig(source="messages", languages=["de"]))
    assert texts == ["Select a colour for the text", "Wählen Sie eine Farbe für den Text"]
    assert read_pairs(DataConfig(source="messages", languages=["de"])) == [tuple(texts)]  # (source, translation)
    with pytest.raises(DataError, match="data.languages: 'xx' is not one of de, fr"):
        read_texts(DataConfig(source="messages", languages=["xx"]))
    with pytest.raises(DataError, match=r"data.languages = \['fr'\]: no message catalogues beyond the evaluation"):
        read_texts(DataConfig(source="messages", languages=["fr"]))
