"""Which teacher layers each student layer learns from (KD-NAS's layer mappings)."""

from __future__ import annotations

from kdnas_core.config import LossWeights
from kdnas_core.errors import KdnasError


MAPPINGS = ("uniform", "last", "uniform+last", "all-to-one")


# --------------------------------------------------------------------------- layer mapping


def layer_mapping(n_student: int, n_teacher: int, strategy: str) -> list[tuple[int, ...]]:
    """Teacher hidden-state indices each student hidden state learns from.

    Returns ``n_student + 1`` tuples: entry 0 maps embeddings to embeddings; entry i (1-based
    student layer) lists teacher layers. "all-to-one" sends every student layer to the teacher's
    last layer.
    """
    if strategy not in MAPPINGS:
        raise KdnasError(f"distill.mapping = {strategy!r}: expected one of {', '.join(MAPPINGS)}")
    step = n_teacher // n_student
    out: list[tuple[int, ...]] = [(0,)]
    for i in range(1, n_student + 1):
        # A student deeper than its teacher (step 0) spreads its layers evenly instead.
        uniform = i * step if step else max(1, round(i * n_teacher / n_student))
        last = max(1, n_teacher - n_student + i)
        chosen = {
            "uniform": (uniform,),
            "last": (last,),
            "uniform+last": tuple(dict.fromkeys((uniform, last))),
            "all-to-one": (n_teacher,),
        }[strategy]
        out.append(chosen)
    return out


def teacher_layers_needed(
    student_layers: list[int] | tuple[int, ...], n_teacher: int, strategy: str, weights: LossWeights
) -> tuple[int, ...]:
    """Union of teacher states that students with any of ``student_layers`` layers need, so one
    cache serves a whole search space."""
    need: set[int] = set()
    for n in student_layers if weights.hidden_mse > 0 else ():  # only the hidden-state term maps layers
        for targets in layer_mapping(n, n_teacher, strategy):
            need.update(targets)
    if weights.attention_relation > 0:
        need.add(n_teacher)  # the relation layer's states ride along with its Q/K/V
    if weights.pooled_cosine > 0:
        need.add(n_teacher)
    return tuple(sorted(need))
