"""The zero-cost screen of an episode (``search.screen``): many candidates scored before any
training, only the best few proxy-distilled.

Every student is a sub-network of the teacher, so each candidate of the controller's pool can be
scored with forward passes only (``search.signals.SignalProbe.zero_cost``: a quality loss in
[0, 1], lower is better). Pure functions over those scores; no model is touched here.

- ``choose``: the episode's candidates from a screened pool: for every budget, the best-screened
  candidate expected within [near, 0.95] of it (the recommendation for a budget is the best
  candidate within it, so each needs one near it); the rest by estimated reward, rank-averaged
  with the controller's own prediction where it has one.
- ``pseudo_observations``: the screened candidates that were not distilled, as the controller
  learns from them: the zero-cost score mapped onto the proxy's quality term by a line fitted on
  the candidates that have both, at the expected latency.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from kdnas_core.search.controller import Observation
from kdnas_core.search.space import StudentArch

# Zero-cost quality losses of architectures, in order.
Screen = Callable[[list[StudentArch]], list[float]]
RewardFn = Callable[[float, float], float]

# A pseudo observation counts for the controller only once the zero-cost screen has been checked
# against this many distilled candidates (a line through fewer points is a guess).
MIN_CALIBRATION = 3


def _ranks(values: Sequence[float], higher_is_better: bool = True) -> np.ndarray:
    """0 for the best value, 1 for the next, ... (ties broken by position)."""
    v = np.asarray(values, dtype=float)
    order = np.argsort(-v if higher_is_better else v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    return ranks


def choose(pool: Sequence[StudentArch], screened: dict[str, float], k: int, reward_fn: RewardFn,
           latency: Callable[[StudentArch], float] | None = None, budgets_ms: Sequence[float] = (),
           near: float = 0.75, predicted: Sequence[float] | None = None) -> list[StudentArch]:
    """``k`` candidates of a screened ``pool`` (``screened``: arch name -> zero-cost loss)."""
    pool = list(pool)
    if not pool:
        return []
    if latency is not None:
        expected = {a.arch_id: latency(a) for a in pool}
        estimate = [reward_fn(screened[a.name], expected[a.arch_id]) for a in pool]
    else:  # nothing measured yet: quality alone
        expected, estimate = {}, [1.0 - screened[a.name] for a in pool]
    order = _ranks(estimate)
    if predicted is not None:
        order = order + _ranks(predicted)
    picks: list[StudentArch] = []
    for b in sorted(budgets_ms) if latency is not None else ():
        band = [a for a in pool if near * b <= expected[a.arch_id] <= 0.95 * b and a not in picks]
        if band and len(picks) < k:
            picks.append(min(band, key=lambda a: screened[a.name]))
    for i in np.argsort(order, kind="stable"):
        if len(picks) >= k:
            break
        if pool[i] not in picks:
            picks.append(pool[i])
    return picks


def calibration(history: Sequence[Observation], screened: dict[str, float]) -> Callable[[float], float] | None:
    """The zero-cost loss mapped onto the proxy's quality term: a least-squares line over the
    distilled candidates that were also screened, clipped to [0, 1] (None with too few)."""
    pairs = [(screened[o.arch.name], o.quality_loss) for o in history if not o.failed and o.arch.name in screened]
    if len(pairs) < MIN_CALIBRATION or len({x for x, _ in pairs}) < 2:
        return None
    x, y = np.array(pairs, dtype=float).T
    slope, intercept = np.polyfit(x, y, 1)
    return lambda z: float(min(1.0, max(0.0, slope * z + intercept)))


def pseudo_observations(history: Sequence[Observation], screened: dict[str, float], reward_fn: RewardFn,
                        latency: Callable[[StudentArch], float] | None, episode: int,
                        context: tuple[str | None, str | None]) -> list[Observation]:
    """Screened, never distilled candidates with their estimated quality and reward (marked
    ``extra["screened"]``): what the controller also learns from. Never recommended: they live
    only in the controller's training set, not in the search's observations."""
    to_proxy = calibration(history, screened)
    if to_proxy is None or latency is None:
        return []
    distilled = {o.arch.name for o in history}
    out = []
    for name, z in sorted(screened.items()):
        if name in distilled:
            continue
        arch = StudentArch.from_name(name)
        q, ms = to_proxy(z), latency(arch)
        out.append(Observation(arch, q, ms, reward_fn(q, ms), episode, context, {"screened": True}))
    return out
