"""Quality signals of a candidate: what the search can know of a student before its final
distillation, to rank the candidates of one latency budget.

Two moments, the same held-out texts (the eval split's KD-loss slice, never trained on):

- **zero-cost**: the student as it is cut from the teacher, no training step. Every student is a
  sub-network of the teacher, so it can be scored with forward passes only (Minitron ranks its
  candidates this way): its held-out KD loss with the projection heads started as distillation
  starts them, and how its sentence embeddings keep the teacher's neighbourhoods.
- **proxy**: the same after the proxy distillation, plus translation recall@1 of held-out pairs
  when the corpus is parallel.

Which signal orders students like their final downstream summary is a measurement
(``python -m bench.proxy_rank --budget``), not an assumption: the paper's L_HS ranks the
multilingual students the other way round from retrieval.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from torch import nn

from kdnas_core.distill import held_out_loss
from kdnas_core.errors import KdnasError
from kdnas_core.evaluation.evaluate import embed, linear_cka, neighbour_recall
from kdnas_core.evaluation.scoring import retrieval_ranks
from kdnas_core.progress import Progress, track
from kdnas_core.search.reward import l_hs, normalised_loss
from kdnas_core.search.space import StudentArch
from kdnas_core.workspace import Workspace

# Every signal a candidate gets (Signals' fields but the cost); reward.quality names one of them.
SIGNALS = ("hidden", "hidden_last", "cosine", "recall10", "cka", "translation_r1")
# Signals where a larger value means a better student; the rest are losses.
HIGHER_IS_BETTER = frozenset({"recall10", "cka", "translation_r1"})
# Signals that need (text, source) pairs in the corpus (data.source: messages or a source_column).
NEEDS_PAIRS = frozenset({"translation_r1"})


@dataclass(frozen=True)
class Signals:
    """One student's quality signals on the held-out texts (None: not defined for this corpus
    or this loss configuration)."""

    hidden: float | None  # normalised hidden-state loss L_HS in [0, 1] (the paper's quality term)
    cosine: float | None  # the pooled-cosine loss term alone
    recall10: float | None  # teacher-neighbour recall@10 of the sentence embeddings (None: <= 10 texts)
    cka: float  # linear CKA between the student's and the teacher's sentence embeddings
    translation_r1: float | None = None  # held-out text -> its source sentence, recall@1, both ways
    hidden_last: float | None = None  # the last state's hidden-state loss alone, in [0, 1]
    seconds: float = 0.0  # what computing them cost (forward passes, no training)

    def to_dict(self) -> dict:
        return asdict(self)

    def quality(self, name: str) -> float:
        """``name`` as a loss in [0, 1] (lower is better), the form the reward's quality term takes."""
        if name not in SIGNALS:
            raise KdnasError(f"quality signal {name!r}: expected one of {', '.join(SIGNALS)}")
        value = getattr(self, name)
        if value is None:
            raise KdnasError(f"quality signal {name!r} is not available here"
                             + (": the corpus has no translation pairs (data.source: messages or data.source_column)"
                                if name in NEEDS_PAIRS else ": more than 10 held-out texts are needed (data.eval_size)"
                                if name == "recall10" else ": its loss term is off (distill.weights)"))
        value = float(value)
        return min(1.0, max(0.0, 1.0 - value if name in HIGHER_IS_BETTER else value))


class SignalProbe:
    """The held-out texts, the teacher's embeddings of them and the teacher states the KD loss
    reads, built once; then any student's ``Signals`` costs its forward passes only."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.texts = ws.texts("eval")
        self.eval_states = ws.eval_states(ws.layers_for(ws.space.layers), progress=False)
        self.eval_batches = ws.batches("eval")
        self.teacher_emb = self._embed(ws.teacher.model, self.texts)
        sources = ws.splits.sources
        self.pairs = [(t, sources[t]) for t in self.texts if t in sources]

    def _embed(self, model: nn.Module, texts: list[str]) -> np.ndarray:
        return embed(model, self.ws.teacher.tokenizer, texts, self.ws.cfg.data.max_length,
                     batch_size=self.ws.cfg.data.batch_size)

    def zero_cost(self, arch: StudentArch) -> Signals:
        """``arch`` as it is cut from the teacher (or drawn at random under ``student.init:
        random``), scored without a training step."""
        t0 = time.perf_counter()
        start = self.ws.start_student(arch)
        return self.of(start.model, self.kd_parts(start.model, start.init_heads), t0)

    def kd_parts(self, student: nn.Module, init_heads=None) -> dict[str, float]:
        cfg = self.ws.cfg
        _, parts = held_out_loss(student, self.eval_states, self.eval_batches, cfg.distill.recipe("proxy"), init_heads=init_heads,
                                 seed=cfg.seed, pooling=self.ws.teacher.head.pooling)
        return parts

    def of(self, student: nn.Module, kd_parts: dict[str, float], t0: float | None = None) -> Signals:
        """The signals of ``student`` given its held-out KD-loss parts (a distillation's
        ``eval_parts``, or ``kd_parts``)."""
        t0 = time.perf_counter() if t0 is None else t0
        emb = self._embed(student, self.texts)
        r1 = None
        if self.pairs:
            a = self._embed(student, [t for t, _ in self.pairs])
            b = self._embed(student, [s for _, s in self.pairs])
            r1 = float(((retrieval_ranks(a, b) == 0).mean() + (retrieval_ranks(b, a) == 0).mean()) / 2)
        return Signals(
            hidden=l_hs(kd_parts),
            hidden_last=None if "hidden_mse_last" not in kd_parts else normalised_loss(kd_parts["hidden_mse_last"]),
            cosine=kd_parts.get("pooled_cosine"),
            recall10=neighbour_recall(self.teacher_emb, emb, k=10) if len(self.texts) > 10 else None,
            cka=linear_cka(self.teacher_emb, emb),
            translation_r1=r1,
            seconds=round(time.perf_counter() - t0, 3),
        )


def zero_cost_screen(probe: Callable[[], SignalProbe], signal: str, progress: Progress = False):
    """A ``search.screen`` scorer: each architecture's zero-cost ``signal`` as a quality loss in
    [0, 1]. ``probe`` gives the probe the proxy evaluator uses too (built at the first call: a
    search without a screen pays nothing). A candidate that cannot be cut or run scores the worst
    (1.0) instead of stopping the episode: the screen only orders candidates, the proxy run still
    judges them."""

    def screen(archs: list[StudentArch]) -> list[float]:
        p = probe()
        out = []
        for arch in track(archs, "screen", progress, "candidate"):
            try:
                out.append(p.zero_cost(arch).quality(signal))
            except (KdnasError, RuntimeError, ValueError) as err:
                warnings.warn(f"screen: {arch.name} scored as the worst ({type(err).__name__}: {err})")
                out.append(1.0)
        return out

    return screen
