"""A tiny multilingual teacher (XLM-R family, SentencePiece-style Unigram vocabulary) through the
whole path: search with teacher-initialised students, a final student trimmed to its corpus's
vocabulary, ONNX export and translation retrieval in both directions."""

import pandas as pd
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

from kdnas_core.config import config_from_dict
from kdnas_core.final import final_student
from kdnas_core.evaluation.packaged import load_packaged
from kdnas_core.search.space import StudentArch
from kdnas_core.pipeline import search_without_prefect
from kdnas_core.evaluation.table import evaluate_students
from kdnas_core.workspace import Workspace

pytestmark = pytest.mark.slow


def _unigram_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=1500, unk_token="<unk>",
                                                           special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def test_a_tiny_multilingual_teacher_through_search_trimming_export_and_evaluation(tmp_path):
    cache = tmp_path / "cache"
    fr, it, de = (load_packaged(f"gettext-{lang}", cache) for lang in ("fr", "it", "de"))
    # The corpus: French and Italian messages with their English originals, each translation
    # distilled towards the teacher's embedding of its original (data.translation_targets). The
    # evaluation scores German pairs; an English text the corpus holds is left out of them.
    pairs = pd.concat([fr[:200], it[:200]])[["query", "positive"]]
    corpus = list(pairs["query"]) + list(pairs["positive"])
    tok = _unigram_tokenizer(corpus + list(de["query"][:500]) + list(de["positive"][:500]))
    torch.manual_seed(0)
    teacher = XLMRobertaModel(XLMRobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4,
                                               num_attention_heads=4, intermediate_size=128, pad_token_id=1,
                                               max_position_embeddings=130))
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    pairs.to_csv(tmp_path / "pairs.csv", index=False)
    cfg = config_from_dict({
        "paths": {"cache_dir": str(cache), "output_dir": str(tmp_path / "runs")},
        "teacher": {"name": str(tmp_path / "teacher")},
        "data": {"source": "csv", "path": str(tmp_path / "pairs.csv"), "source_column": "query",
                 "text_column": "positive", "translation_targets": True, "eval_size": 48, "proxy_size": 64,
                 "batch_size": 16, "max_length": 32},
        "search_space": {"layers": [1, 2], "hidden": [32, 64], "heads": [2, 4], "ffn": [64, 128], "activation": ["gelu"]},
        "student": {"vocab": "corpus"},
        "distill": {"proxy": {"epochs": 1}, "final": {"epochs": 1, "max_steps": 3}, "eval_batches": 2},
        "latency": {"grid": [[1, 16]], "runs": 3, "warmup": 1},
        "reward": {"budgets": ["1000ms"]},
        "search": {"episodes": 1, "candidates_per_episode": 2},
        "tracking": {"enabled": False},
        "evaluate": {"bootstrap": 100, "fidelity_texts": 40, "tasks": [
            {"kind": "retrieval", "source": "packaged", "path": "gettext-de", "test_size": 150},
            {"kind": "retrieval", "source": "packaged", "path": "gettext-de", "test_size": 150, "reverse": True}]},
    })
    ws = Workspace.prepare(cfg)
    assert len(ws.splits.sources) > 300  # each translation has its English original as target
    result, _, _ = search_without_prefect(cfg, ws=ws, progress=False)
    arch = StudentArch.from_name(result.recommendations[0].arch)
    final = final_student(cfg, ws, arch, progress=False).exported(cfg.latency)

    student = AutoModel.from_pretrained(final.path)
    assert type(student).__name__ == "XLMRobertaModel"  # the teacher's own family, cut from it
    student_tok = AutoTokenizer.from_pretrained(final.path)
    assert student.config.vocab_size == len(student_tok) < len(tok)
    assert student_tok.tokenize(corpus[0]) == tok.tokenize(corpus[0])  # corpus text tokenises as before
    table = evaluate_students(ws, [final.path], progress=False)
    assert table.role.tolist() == ["teacher", "student", "inherited", "floor"]
    row = table.iloc[1]
    for label in ("gettext-de", "gettext-de-reverse"):
        assert 0 < row[f"{label}.mrr"] <= 1 and 0 <= row[f"{label}.recall@1"] <= 1
    assert table.iloc[0]["gettext-de.mrr"] > 0
