"""Vocabulary trimming (``student.vocab: corpus``): a student keeps only the tokens its corpus uses.

A multilingual teacher's word embedding is most of its parameters (XLM-R: 250k x 768 of 278 M),
and a student with a small encoder keeps all of it. Tokens the distillation corpus never produces
get no gradient and tell the student nothing, so they can go: the kept rows are remapped to new
ids and a tokenizer that produces those ids is saved with the student.

What is kept: every token the corpus (plus any extra texts) tokenises into, the special tokens,
every single-character piece of the vocabulary, and (``student.vocab_keep_top``) the teacher's
most likely pieces, so that text from outside the corpus (another domain, another language the
teacher knows) keeps its words whole instead of falling apart into characters. A word made of
kept pieces tokenises as before; another word falls back to shorter kept pieces, down to single
characters, and only a character the teacher's vocabulary has never had becomes the unknown
token, as it did before.

Supports the three ``tokenizers`` models that Hugging Face encoders use: WordPiece (BERT,
MPNet), Unigram (XLM-R) and BPE (RoBERTa). Trimming changes no output for text made of kept
tokens: the kept rows are the same numbers under new ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from torch import nn

from kdnas_core.errors import KdnasError

SPECIAL_ATTRS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
                 "unk_token_id")


def _pieces(model: dict) -> list[str]:
    """The vocabulary's pieces by id."""
    if model["type"] == "Unigram":
        return [p for p, _ in model["vocab"]]
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    return [p for p, _ in by_id]


def _single_character(piece: str, model: dict) -> bool:
    prefix = model.get("continuing_subword_prefix") or ""
    core = piece[len(prefix):] if prefix and piece.startswith(prefix) else piece
    return len(core.lstrip("▁")) <= 1  # Unigram marks word starts with ▁


def most_likely(model: dict, n: int) -> list[int]:
    """The ids of the vocabulary's ``n`` most likely pieces. Unigram (XLM-R) stores each piece's
    log-probability; BPE (RoBERTa) ids follow the merge order, most frequent merges first;
    WordPiece (BERT) keeps no frequencies, so its vocabulary order stands in (a weak ranking)."""
    if n <= 0:
        return []
    if model["type"] == "Unigram":
        scores = [score for _, score in model["vocab"]]
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]
    return list(range(min(n, len(model["vocab"]))))


def kept_ids(tokenizer, texts: Iterable[str], batch: int = 1000, keep_top: int = 0) -> list[int]:
    """Sorted teacher ids to keep for ``texts``: what they tokenise into, the special tokens,
    every single-character piece and the ``keep_top`` most likely pieces."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    keep: set[int] = set(tokenizer.all_special_ids) | set(most_likely(spec["model"], keep_top))
    keep |= {t["id"] for t in spec.get("added_tokens", [])}
    keep |= {i for i, p in enumerate(_pieces(spec["model"])) if _single_character(p, spec["model"])}
    texts = list(texts)
    for i in range(0, len(texts), batch):
        for ids in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]:
            keep.update(ids)
    if spec["model"]["type"] == "BPE":
        keep |= _merge_parts(spec["model"], keep)
    return sorted(keep)


def _merge_parts(model: dict, keep: set[int]) -> set[int]:
    """BPE builds a token by merging two shorter ones: every piece on the way to a kept token
    must stay, or the merge chain breaks and the token is never produced."""
    vocab = model["vocab"]
    made_of: dict[str, tuple[str, str]] = {}
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        made_of.setdefault(a + b, (a, b))
    pieces = {p for p, i in vocab.items() if i in keep}
    todo = list(pieces)
    while todo:
        for part in made_of.get(todo.pop(), ()):
            if part not in pieces and part in vocab:
                pieces.add(part)
                todo.append(part)
    return {vocab[p] for p in pieces}


def _remap_post_processor(node, new_id: dict[int, int]):
    """Special-token ids inside a post-processor (Template, Bert, Roberta or a Sequence of them)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("sep", "cls") and isinstance(v, list) and len(v) == 2:
                out[k] = [v[0], new_id[v[1]]]
            elif k == "ids" and isinstance(v, list):
                out[k] = [new_id[i] for i in v]
            else:
                out[k] = _remap_post_processor(v, new_id)
        return out
    if isinstance(node, list):
        return [_remap_post_processor(x, new_id) for x in node]
    return node


def _trim_model(model: dict, keep: list[int], new_id: dict[int, int]) -> dict:
    pieces = _pieces(model)
    kept = [pieces[i] for i in keep]
    if model["type"] == "Unigram":
        out = {**model, "vocab": [model["vocab"][i] for i in keep]}
        if model.get("unk_id") is not None:
            out["unk_id"] = new_id[model["unk_id"]]
        return out
    if model["type"] == "WordPiece":
        return {**model, "vocab": {p: j for j, p in enumerate(kept)}}
    if model["type"] == "BPE":
        kept_set = set(kept)
        merges = [m for m in model["merges"]
                  if (pair := (m.split(" ") if isinstance(m, str) else m))
                  and pair[0] in kept_set and pair[1] in kept_set and pair[0] + pair[1] in kept_set]
        return {**model, "vocab": {p: j for j, p in enumerate(kept)}, "merges": merges}
    raise KdnasError(f"student.vocab: corpus cannot trim a {model['type']} tokenizer (WordPiece, Unigram and BPE can be)")


def trim_tokenizer(tokenizer, keep: list[int]):
    """A fast tokenizer over the kept pieces, ids 0..len(keep)-1 in the teacher's order."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    new_id = {old: new for new, old in enumerate(keep)}
    spec["model"] = _trim_model(spec["model"], keep, new_id)
    spec["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in spec.get("added_tokens", [])]
    spec["post_processor"] = _remap_post_processor(spec.get("post_processor"), new_id)
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_id.get(spec["padding"].get("pad_id", 0), 0)
    special = {k: getattr(tokenizer, k) for k in ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token",
                                                  "bos_token", "eos_token") if getattr(tokenizer, k, None)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   model_max_length=tokenizer.model_max_length, **special)


def trim_embeddings(model: nn.Module, keep: list[int]) -> nn.Module:
    """The kept rows of the word embedding under their new ids; config ids follow."""
    old = model.get_input_embeddings()
    index = torch.tensor(keep, dtype=torch.long)
    new = nn.Embedding(len(keep), old.embedding_dim, padding_idx=None)
    with torch.no_grad():
        new.weight.copy_(old.weight[index])
    new_id = {o: n for n, o in enumerate(keep)}
    if old.padding_idx is not None and old.padding_idx in new_id:
        new.padding_idx = new_id[old.padding_idx]
    model.set_input_embeddings(new)
    model.config.vocab_size = len(keep)
    for attr in SPECIAL_ATTRS:
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value in new_id:
            setattr(model.config, attr, new_id[value])
    return model


def trim_to_corpus(model: nn.Module, tokenizer, texts: Iterable[str], keep_top: int = 0) -> tuple[nn.Module, object, dict]:
    """The student and a tokenizer trimmed to what ``texts`` use (and the ``keep_top`` most likely
    pieces); and what it saved."""
    before = sum(p.numel() for p in model.parameters())
    keep = kept_ids(tokenizer, texts, keep_top=keep_top)
    vocab_before = model.get_input_embeddings().num_embeddings
    trim_embeddings(model, keep)
    after = sum(p.numel() for p in model.parameters())
    return model, trim_tokenizer(tokenizer, keep), {"vocab_before": vocab_before, "vocab_after": len(keep),
                                                    "params_before": before, "params_after": after}
