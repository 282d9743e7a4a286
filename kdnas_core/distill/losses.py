"""The distillation loss: projected multi-layer hidden-state MSE on standardised targets, a pooled
cosine term, in-batch similarity relations of the pooled embeddings, and MiniLMv2 attention
relations. Plain modules; no logging or config parsing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdnas_core.config import LossWeights
from kdnas_core.errors import KdnasError
from kdnas_core.sentence import pool

from kdnas_core.distill.targets import LayerStats, Targets


# --------------------------------------------------------------------------- the loss


def _row_kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each row of two log-softmaxed relation matrices. Masked entries
    are -inf on both sides; their -inf - -inf is NaN and counts as 0."""
    return (log_t.exp() * (log_t - log_s)).nan_to_num(0.0).sum(-1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, heads: int,
                n_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """MiniLMv2 self-attention relation loss for one of Q, K or V.

    Both sides are split into the same number of relation heads (so student and teacher may have
    different widths and attention-head counts); relations are scaled dot products between the
    tokens of a text; the loss is KL(teacher || student) over keys, averaged over real query
    tokens and heads.
    """

    def log_relations(x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = x.view(b, t, heads, d // heads).transpose(1, 2)  # [B, R, T, d/R]
        scores = h @ h.transpose(-1, -2) / math.sqrt(d // heads)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        return F.log_softmax(scores, dim=-1)

    kl = _row_kl(log_relations(teacher), log_relations(student))  # [B, R, T]
    q = mask.to(kl.dtype)[:, None, :]
    return (kl * q).sum() / ((q.sum() if n_tokens is None else n_tokens) * heads)


# Sharp enough that a text's nearest teacher neighbours carry most of its row (SimCSE's 0.05).
RELATION_TEMPERATURE = 0.05


def similarity_kl(student: torch.Tensor, teacher: torch.Tensor, n_texts: float | int,
                  temperature: float = RELATION_TEMPERATURE) -> torch.Tensor:
    """In-batch similarity distillation: for each text, KL(teacher || student) between the
    softmax over the batch's other texts of their cosine similarities to it. It asks the student
    to order a text's neighbours as the teacher does, which is what retrieval and clustering read,
    where a per-text cosine to the teacher leaves the small errors that reorder close neighbours.
    Summed over texts and divided by ``n_texts`` (0 for a batch of one text)."""
    if student.shape[0] < 2:
        return student.new_zeros(())

    def log_neighbours(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        sims = x @ x.T / temperature
        return F.log_softmax(sims.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), float("-inf")), -1)

    return _row_kl(log_neighbours(teacher), log_neighbours(student)).sum() / n_texts


class HiddenStateDistillLoss(nn.Module):
    """KD-NAS multi-layer hidden-state loss, with optional pooled-cosine and relation terms.

    A plain module (no logging, no config parsing) holding the learned projections; the trainer
    optimises it together with the student.
    """

    def __init__(
        self,
        d_student: int,
        d_teacher: int,
        mapping: list[tuple[int, ...]],
        weights: LossWeights,
        stats: LayerStats | None = None,
        relation_heads: int = 12,
        pooling: str = "mean",
    ):
        super().__init__()
        self.mapping = [tuple(m) for m in mapping]
        self.pooling = pooling  # the teacher's own sentence pooling: the pooled term targets its embedding
        self.d_teacher = d_teacher
        self.weights = weights
        self.relation_heads = relation_heads
        # One projection per student state, to all its teacher targets at once (concatenated).
        # Zero-initialised: the loss starts exactly at the "predict each dimension's mean"
        # baseline (1.0 on standardised targets) instead of above it, so even a short proxy
        # distillation shows learning as a loss below 1 (measured: 1.04 -> 0.89 after 16 steps).
        self.proj = nn.ModuleList(nn.Linear(d_student, d_teacher * len(m)) for m in self.mapping)
        for lin in self.proj:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.pool_proj = nn.Linear(d_student, d_teacher) if weights.pooled_cosine > 0 else None
        if weights.attention_relation > 0 and (d_student % relation_heads or d_teacher % relation_heads):
            raise KdnasError(
                f"distill.relation_heads = {relation_heads} must divide both student hidden "
                f"{d_student} and teacher hidden {d_teacher}"
            )
        self.stat_index = {layer: k for k, layer in enumerate(stats.layers)} if stats else {}
        if stats is not None:
            self.register_buffer("mean", stats.mean.clone(), persistent=False)
            self.register_buffer("std", stats.std.clone(), persistent=False)

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for m in self.mapping for l in m}))

    def _standardise(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if not self.stat_index:
            return x
        k = self.stat_index[layer]
        return (x - self.mean[k]) / self.std[k]

    def forward(
        self,
        student_states: tuple[torch.Tensor, ...],
        targets: Targets,
        mask: torch.Tensor,
        student_qkv: tuple[torch.Tensor, ...] | None = None,
        norm: tuple[float, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``norm`` = (tokens, texts) of the whole batch when this call sees only a slice of it
        (data parallel): each term is then this slice's share of the whole batch's mean, so the
        shares summed over processes equal the loss one process computes on the whole batch."""
        if len(student_states) != len(self.mapping):
            raise KdnasError(f"loss expects {len(self.mapping)} student states, got {len(student_states)}")
        m = mask.to(student_states[0].dtype)
        n_tokens, n_texts = norm if norm is not None else (m.sum(), mask.shape[0])
        parts: dict[str, torch.Tensor] = {}
        total = student_states[0].new_zeros(())
        if self.weights.hidden_mse > 0:
            per_layer = []
            for proj, s, layers in zip(self.proj, student_states, self.mapping):
                pred = proj(s).unflatten(-1, (len(layers), self.d_teacher))  # [B, T, k, d]
                target = torch.stack([self._standardise(l, targets.states[l]) for l in layers], dim=2)
                se = (pred - target).pow(2).mean(dim=(-1, -2))  # [B, T]
                per_layer.append((se * m).sum() / n_tokens)
            parts["hidden_mse"] = torch.stack(per_layer).mean()
            if len(per_layer) > 1:
                # The transformer layers alone: the search's L_HS. Entry 0 (embeddings to embeddings)
                # is matched almost for free by a student cut from the teacher, and weighs 1/(n+1)
                # of the mean above: with it a one-layer student's loss is half its layer's, and a
                # search prefers the shallowest students whatever their layers learned.
                parts["hidden_mse_layers"] = torch.stack(per_layer[1:]).mean()
                # The last state alone: the mappings send it to the teacher's last layer, the one a
                # sentence embedding is pooled from ("uniform" only where the student's depth
                # divides the teacher's), so it compares students of any depth.
                parts["hidden_mse_last"] = per_layer[-1]
            total = total + self.weights.hidden_mse * parts["hidden_mse"]
        if self.pool_proj is not None:
            s_pool = self.pool_proj(pool(student_states[-1], mask, self.pooling))
            t_pool = targets.pooled if targets.pooled is not None else pool(targets.states[max(targets.states)], mask,
                                                                            self.pooling)
            if targets.has_source is not None:
                t_pool = torch.where(targets.has_source.unsqueeze(-1), targets.source_pooled, t_pool)
            parts["pooled_cosine"] = (1 - F.cosine_similarity(s_pool, t_pool, dim=-1)).sum() / n_texts
            total = total + self.weights.pooled_cosine * parts["pooled_cosine"]
            if self.weights.pooled_relation > 0:
                # Within this call's texts: under data parallelism each process relates its own slice.
                parts["pooled_relation"] = similarity_kl(s_pool, t_pool, n_texts)
                total = total + self.weights.pooled_relation * parts["pooled_relation"]
        if self.weights.attention_relation > 0:
            if student_qkv is None or targets.qkv is None:
                raise KdnasError("attention_relation weight > 0 needs student and teacher Q/K/V states")
            t_qkv = targets.qkv.chunk(3, dim=-1)
            rel = [relation_kl(s, t, mask, self.relation_heads, n_tokens) for s, t in zip(student_qkv, t_qkv)]
            parts["attention_relation"] = torch.stack(rel).mean()
            total = total + self.weights.attention_relation * parts["attention_relation"]
        return total, {k: float(v.detach()) for k, v in parts.items()}
