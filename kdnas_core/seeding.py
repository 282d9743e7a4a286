"""The one place that reseeds torch's global random generator."""

from __future__ import annotations

import torch


def seed_torch(seed: int) -> None:
    """Reseed torch's global generator (CPU and every GPU) with ``seed``.

    Seeded code reseeds the global generator instead of passing a ``torch.Generator`` around
    because what it makes reproducible draws only from the global one: weight initialisation
    (``nn.Linear``, ``BertModel(config)``) and dropout take no generator argument, and training
    checkpoints save and restore the global state so that a resumed run ends bit-identically.
    The state is not restored afterwards: training continues the seeded stream.
    """
    torch.manual_seed(seed)
