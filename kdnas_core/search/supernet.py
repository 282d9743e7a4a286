"""The teacher trained as a weight-shared super-network of its students (DynaBERT, arXiv
2004.04037; AutoTinyBERT, 2107.13686; HAT, 2005.14187), so that any candidate can be scored
after one shared distillation instead of a proxy run of its own.

Every candidate is cut from the teacher by index selections (``inherit.cut_values``), so the
teacher's weights can serve as the weights of all its students at once. Each step draws a few
students of the search space, runs each on the same proxy batch through
``torch.func.functional_call`` with its cut of the shared weights, and adds the gradients of its
proxy-recipe KD loss into them. The projection heads stay where a cut student's start them (each
kept dim predicts the teacher dim it was cut from, at every target layer), so nothing is learned
per student: the shared weights must serve every cut. The embedding tables stay the teacher's (for me5-small they
are 80 % of the weights). Afterwards a candidate cut from the trained super-network is scored by
the zero-cost screen's signals, in forward passes only (``SuperNet.signals``).

Whether that orders students within a budget better than the zero-cost screen or the proxy run
is a measurement (``python -m bench.supernet``), not an assumption.
"""

from __future__ import annotations

import copy
import functools
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from kdnas_core.distill.losses import HiddenStateDistillLoss
from kdnas_core.distill.mapping import layer_mapping
from kdnas_core.errors import KdnasError
from kdnas_core.inherit import InheritedSelection, build_inherited, cut_values, empty_student, init_projections
from kdnas_core.progress import Progress, track
from kdnas_core.search.signals import SignalProbe, Signals
from kdnas_core.search.space import StudentArch
from kdnas_core.seeding import seed_torch
from kdnas_core.workspace import Workspace


@dataclass
class SuperNetRun:
    """What a super-network's training did (small and serialisable)."""

    steps: int = 0
    students_drawn: int = 0  # draws over all steps (a student may be drawn more than once)
    distinct_students: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # each step's mean KD loss over its students

    def to_dict(self) -> dict:
        return {"steps": self.steps, "students_drawn": self.students_drawn,
                "distinct_students": self.distinct_students, "seconds": round(self.seconds, 1),
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last_10": sum(self.losses[-10:]) / len(self.losses[-10:]) if self.losses else None}


class SuperNet:
    """A trainable copy of ``ws``'s teacher whose cuts are the search space's students."""

    def __init__(self, ws: Workspace, probe: Callable[[], SignalProbe] | None = None):
        if ws.inheritance is not None:
            raise KdnasError(f"a super-network needs students cut from the teacher ({ws.inheritance})")
        recipe = ws.cfg.distill.recipe("proxy")
        if recipe.weights.attention_relation > 0:
            raise KdnasError("super-network: distill.weights.attention_relation must be 0 (Q/K/V relations "
                             "of a functional student are not captured)")
        self.ws, self.recipe = ws, recipe
        self.model = copy.deepcopy(ws.teacher.model).float().eval()  # eval: no dropout, the proxy's signal is exact
        for n, p in self.model.named_parameters():
            p.requires_grad_("embeddings" not in n)
        self._probe = probe or functools.cache(lambda: SignalProbe(ws))
        layers = ws.layers_for(ws.space.layers)
        self.states = ws.cached_states("proxy", layers, progress=False)
        self.batches = ws.distill_batches("proxy", self.states, progress=False)
        self._embeddings: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # by kept hidden dims
        self.run = SuperNetRun()

    @property
    def probe(self) -> SignalProbe:
        return self._probe()

    def _selection(self, arch: StudentArch) -> InheritedSelection:
        return self.ws.selection(self.ws.space.validate(arch))

    def _student(self, arch: StudentArch) -> tuple[nn.Module, InheritedSelection, HiddenStateDistillLoss]:
        ws = self.ws
        sel = self._selection(arch)
        student = empty_student(self.model, arch, sel)
        states = self.states
        stats = states.stats if self.recipe.standardize_targets and self.recipe.weights.hidden_mse > 0 else None
        mapping = layer_mapping(arch.layers, states.n_layers, self.recipe.mapping)
        loss_fn = HiddenStateDistillLoss(arch.hidden, states.hidden, mapping, self.recipe.weights, stats,
                                         self.recipe.relation_heads, ws.teacher.head.pooling)
        init_projections(loss_fn, sel, ws.teacher.hidden, every_target=True)
        return student, sel, loss_fn.requires_grad_(False)

    def _values(self, student: nn.Module, sel: InheritedSelection) -> dict[str, torch.Tensor]:
        key = sel.hidden
        if key not in self._embeddings:  # frozen: cut once per width, not every step
            with torch.no_grad():
                self._embeddings[key] = cut_values(self.model, student, sel, blocks=False)
        values = self._embeddings[key] | cut_values(self.model, student, sel, embeddings=False)
        # A pooler the teacher lacks (mean-pooled encoders) is never read by the loss; zeros keep
        # functional_call off the student's meta tensors.
        for name, p in student.named_parameters():
            if name not in values:  # not setdefault: that would allocate zeros for every parameter
                values[name] = torch.zeros(p.shape)
        return values

    def train(self, steps: int, students_per_step: int = 3, lr: float | None = None, seed: int | None = None,
              draw: Callable[[random.Random], StudentArch] | None = None, progress: Progress = True) -> SuperNetRun:
        """``steps`` optimiser steps over the proxy batches (cycled); each step draws
        ``students_per_step`` students (``draw``, default uniform over the search space) and
        averages their KD losses on the step's batch. Linear warm-up (6 %) and decay, AdamW."""
        seed = self.ws.cfg.seed if seed is None else seed
        seed_torch(seed)
        rng = random.Random(seed)
        draw = draw or self.ws.space.sample
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = lr or self.ws.cfg.distill.proxy.lr or self.ws.cfg.distill.lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.ws.cfg.distill.weight_decay)
        warmup = max(1, int(0.06 * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
        seen: set[str] = set()
        t0 = time.perf_counter()
        for step in track(range(steps), "super-network", progress, "step"):
            batch = self.batches[step % len(self.batches)]
            targets = self.states.targets(batch)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(students_per_step):
                arch = draw(rng)
                seen.add(arch.arch_id)
                student, sel, loss_fn = self._student(arch)
                out = functional_call(student, self._values(student, sel), args=(),
                                      kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                              "output_hidden_states": True})
                loss, _ = loss_fn(out.hidden_states, targets, batch.attention_mask)
                (loss / students_per_step).backward()
                total += float(loss.detach()) / students_per_step
            torch.nn.utils.clip_grad_norm_(params, self.ws.cfg.distill.grad_clip)
            opt.step()
            sched.step()
            self.run.losses.append(total)
            self.run.steps += 1
            self.run.students_drawn += students_per_step
        self.run.distinct_students = len(seen)
        self.run.seconds += time.perf_counter() - t0
        return self.run

    def student(self, arch: StudentArch) -> nn.Module:
        """``arch`` cut from the super-network as it is now: a real, standalone student."""
        return build_inherited(self.model, arch, self._selection(arch)).eval()

    def signals(self, arch: StudentArch) -> Signals:
        """The zero-cost screen's signals of ``arch`` cut from the super-network, on the
        search's held-out texts (forward passes only)."""
        t0 = time.perf_counter()
        sel = self._selection(arch)
        student = build_inherited(self.model, arch, sel).eval()
        # The heads it was trained with: every kept dim predicts the teacher dim it was cut from,
        # at every target layer.
        init = functools.partial(init_projections, selection=sel, teacher_hidden=self.ws.teacher.hidden,
                                 every_target=True)
        return self.probe.of(student, self.probe.kd_parts(student, init), t0)
