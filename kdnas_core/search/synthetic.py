"""A synthetic search problem with a known optimum, for testing and benchmarking controllers
without training any model (archai's dummy-search-space idea)."""

from __future__ import annotations

import random

from kdnas_core.search.loop import Evaluation
from kdnas_core.search.space import SearchSpace, StudentArch

FIELDS = ("layers", "hidden", "heads", "ffn", "activation")


def additive_landscape(space: SearchSpace, seed: int = 0, spread: float = 0.12):
    """KD loss = 0.1 + a seeded per-field effect for each choice (so observations carry
    information a model can learn); latency grows with compute like a CPU's does."""
    rng = random.Random(seed)
    effect = {f: {v: rng.uniform(0, spread) for v in getattr(space, f)} for f in FIELDS}

    def evaluate(arch: StudentArch) -> Evaluation:
        loss = 0.1 + sum(effect[f][getattr(arch, f)] for f in FIELDS)
        latency = 0.5 + arch.layers * (arch.hidden * arch.hidden * 4 + 2 * arch.hidden * arch.ffn) / 2e6
        return Evaluation(kd_loss=min(loss, 1.0), latency_ms=latency, extra={"synthetic": True})

    return evaluate
