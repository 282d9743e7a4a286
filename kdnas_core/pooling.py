"""Sentence embeddings from token states: the mean over real (non-padding) tokens."""

from __future__ import annotations

import torch


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [B, T, d] over the tokens where ``mask`` [B, T] is set; [B, d].

    The distillation loss, the probe and fine-tuning heads and the ONNX scores all pool this
    way, so a student is scored on the embedding it was trained to produce. An all-padding row
    pools to zeros instead of dividing by zero.
    """
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
