"""The KD-NAS reward and latency budgets: pure functions.

    R = (1 - L_HS) * (lat_S / (beta * lat_T)) ** alpha

``L_HS`` is the normalised hidden-state loss: the held-out hidden-state MSE of the student's
transformer layers (not its embeddings, see ``l_hs``) on targets standardised per teacher layer
and dimension, clipped to [0, 1]. Predicting each dimension's mean scores 1, a
perfect student 0, so ``1 - L_HS`` is the share of the teacher's (standardised) hidden-state
variance the student reproduces on unseen text. Standardisation removes the teacher's scale,
which keeps the number comparable across teachers (MiniLM, mpnet, XLM-R). With ``alpha < 0`` a
faster student scores higher; at ``lat_S = beta * lat_T`` the reward equals ``1 - L_HS``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kdnas_core.errors import KdnasError

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(x|ms)\s*$")


def normalised_loss(hidden_mse: float) -> float:
    return min(1.0, max(0.0, float(hidden_mse)))


def l_hs(parts: dict[str, float], fallback: float | None = None) -> float | None:
    """L_HS from a held-out loss's parts: the transformer layers' hidden-state loss. Not the
    training loss's ``hidden_mse``, whose embeddings-to-embeddings term a student cut from the
    teacher matches for free and which weighs 1/(layers + 1): with it, shallower students score
    better for no reason but their depth."""
    value = parts.get("hidden_mse_layers", parts.get("hidden_mse", fallback))
    return None if value is None else normalised_loss(value)


def reward(l_hs: float, lat_student: float, lat_teacher: float, alpha: float = -0.07, beta: float = 0.6) -> float:
    if lat_student <= 0 or lat_teacher <= 0:
        raise KdnasError(f"reward: latencies must be positive (student {lat_student}, teacher {lat_teacher})")
    if not 0.0 <= l_hs <= 1.0 or math.isnan(l_hs):
        raise KdnasError(f"reward: normalised loss {l_hs} outside [0, 1]")
    return (1.0 - l_hs) * (lat_student / (beta * lat_teacher)) ** alpha


@dataclass(frozen=True)
class Budget:
    """A latency budget: ``value`` ms, or ``value`` x the teacher's latency."""

    value: float
    relative: bool
    label: str

    def ms(self, lat_teacher: float) -> float:
        return self.value * lat_teacher if self.relative else self.value


def parse_budget(text: str) -> Budget:
    m = _BUDGET.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise KdnasError(f"budget {text!r}: expected a positive '<fraction>x' of the teacher's latency or '<n>ms'")
    value, unit = float(m.group(1)), m.group(2)
    return Budget(value, unit == "x", str(text).strip())


def budgeted_reward(r: float, lat_student: float, budget_ms: float, mode: str = "exclude",
                    penalty: float = 0.5) -> float | None:
    """The reward as seen under a hard budget: unchanged within it; over it, None (excluded)
    or scaled by ``penalty``."""
    if lat_student <= budget_ms:
        return r
    if mode == "exclude":
        return None
    if mode == "penalize":
        return r * penalty
    raise KdnasError(f"reward.over_budget = {mode!r}: expected 'exclude' or 'penalize'")
