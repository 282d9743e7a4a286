"""The distillation loop: optimiser and schedule, held-out checks that keep the best state (the
start included), checkpoints to resume from, data parallelism, bf16 autocast."""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdnas_core.files.checkpoint import (
    UnusableCheckpoint,
    find_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from kdnas_core.config import DistillConfig, TrainBudget
from kdnas_core.data import Batch
from kdnas_core.errors import KdnasError
from kdnas_core.hardware import precision_name, resolve_device
from kdnas_core.progress import Bar, Progress
from kdnas_core.seeding import seed_torch

from kdnas_core.distill.mapping import layer_mapping
from kdnas_core.distill.targets import TeacherStates, _QKVCapture
from kdnas_core.distill.losses import HiddenStateDistillLoss


# --------------------------------------------------------------------------- the trainer


@dataclass
class DistillResult:
    initial_eval_loss: float | None
    final_eval_loss: float | None
    first_train_loss: float
    last_train_loss: float  # mean over the last 10 % of steps
    steps: int
    tokens_per_s: float
    seconds: float
    eval_parts: dict[str, float] = field(default_factory=dict)
    # (step, training loss), thinned to at most 200 points for logging.
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    # With held-out checks (budget.eval_every): (step, held-out loss) of each check, step 0 the
    # start; the step whose state the student ends with (0: what it inherited, no step improved
    # it); whether patience ran out before the schedule's end.
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    # The learned map of the pooled student state into the teacher's pooled space (when the
    # pooled-cosine term is on): the student's teacher-space layer at export. Not serialised.
    pooled_projection: nn.Linear | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(replace(self, pooled_projection=None))  # asdict would deep-copy the module
        del d["pooled_projection"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DistillResult:
        """A result as ``to_dict`` saved it (kdnas_arch.json); keys of other versions are ignored."""
        names = {f.name for f in fields(cls)} - {"pooled_projection"}
        return cls(**{k: v for k, v in d.items() if k in names})


def _evaluate(student, loss_fn, teacher_states, batches, capture) -> tuple[float, dict[str, float]]:
    was_training = student.training
    student.eval()
    loss_fn.eval()
    total, tokens, parts_sum = 0.0, 0, {}
    with torch.no_grad():
        for b in batches:
            loss, parts = _step_loss(student, loss_fn, teacher_states, b, capture)
            n = b.n_tokens
            total += float(loss) * n
            tokens += n
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * n
    student.train(was_training)
    loss_fn.train(was_training)
    return total / tokens, {k: v / tokens for k, v in parts_sum.items()}


def _step_loss(student, loss_fn, teacher_states: TeacherStates, batch: Batch, capture: _QKVCapture,
               norm: tuple[float, float] | None = None):
    targets = teacher_states.targets(batch)
    device = next(student.parameters()).device
    if device.type != "cpu":
        targets = targets.to(device)
        batch = Batch(batch.index, batch.input_ids.to(device), batch.attention_mask.to(device))
    out = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return loss_fn(out.hidden_states, targets, batch.attention_mask, capture.take(), norm)


class DataParallel:
    """Data parallelism over an initialised ``torch.distributed`` group (torchrun: gloo on the
    CPU, NCCL on GPUs). Every process holds the whole model and every batch; each takes its slice
    of the rows of each batch, computes its share of the batch's loss (normalised by the whole
    batch's tokens and texts) and the gradients are summed: the update is the one a single
    process makes on the whole batch. Plain DistributedDataParallel averages per-process means,
    which differs when slices hold different numbers of tokens (they do: texts vary in length)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @staticmethod
    def active() -> DataParallel | None:
        import torch.distributed as dist

        return DataParallel() if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: Batch) -> Batch:
        rows = slice(self.rank, None, self.world)
        return Batch(batch.index[rows], batch.input_ids[rows], batch.attention_mask[rows])

    def sum_gradients(self, params: list[torch.Tensor], loss: torch.Tensor) -> float:
        """All-reduce every gradient and the loss share in one flat buffer; returns the loss of
        the whole batch."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        # Which parameters got a gradient anywhere: one the loss never reaches (the pooler) must
        # stay without one, as in a single process, or AdamW would decay it there and not here.
        has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype)
        flat = torch.cat([g.reshape(-1) for g in grads] + [has, loss.detach().reshape(1).to(grads[0].dtype)])
        self.dist.all_reduce(flat)
        offset, reached = 0, flat[-1 - len(params):-1]
        for i, (p, g) in enumerate(zip(params, grads)):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if reached[i] > 0 else None
            offset += n
        return float(flat[-1])


@dataclass
class _Trainer:
    """What set-up builds for one distillation and every training step uses."""

    student: nn.Module
    loss_fn: HiddenStateDistillLoss
    teacher_states: TeacherStates
    capture: _QKVCapture
    device: torch.device
    parallel: DataParallel | None
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    grad_clip: float
    best: _Best | None = None  # with held-out checks: the best state so far
    eval_every: int | None = None
    patience: int | None = None
    eval_states: TeacherStates | None = None
    eval_batches: list[Batch] | None = None
    autocast: torch.dtype | None = None  # distill.precision bf16: the forward pass and loss in bfloat16

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The modules a checkpoint holds, by the names it stores them under."""
        best = {} if self.best is None else {"best_student": self.best.student, "best_heads": self.best.heads}
        return {"student": self.student, "heads": self.loss_fn, **best}

    def check(self, run: _RunState) -> None:
        """A held-out check at ``run.step``: a new best is kept, and patience is counted."""
        loss = _evaluate(self.student, self.loss_fn, self.eval_states, self.eval_batches, self.capture)[0]
        run.eval_curve.append([run.step, loss])
        if loss < run.best_loss:
            self.best.keep(self.student, self.loss_fn)
            run.best_step, run.stale_checks = run.step, 0
        else:
            run.stale_checks += 1
            run.stopped_early = self.patience is not None and run.stale_checks >= self.patience

    @property
    def main(self) -> bool:
        """Whether this process shows progress and writes checkpoints (one process of several does)."""
        return self.parallel is None or self.parallel.main


@dataclass
class _RunState:
    """Where training stands: all of it goes into a checkpoint, so a resumed run carries on from it."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    initial_eval_loss: float | None = None
    eval_curve: list[list] = field(default_factory=list)  # [step, held-out loss] of each check
    best_step: int = 0
    stale_checks: int = 0  # checks in a row without a new best
    stopped_early: bool = False

    @property
    def best_loss(self) -> float:
        return next(loss for step, loss in self.eval_curve if step == self.best_step)

    def info(self, total_steps: int) -> dict:
        return {"step": self.step, "total_steps": total_steps, "losses": self.losses, "tokens": self.tokens,
                "seconds": self.seconds, "initial_eval_loss": self.initial_eval_loss, "eval_curve": self.eval_curve,
                "best_step": self.best_step, "stale_checks": self.stale_checks, "stopped_early": self.stopped_early}


class _Best(nn.Module):
    """Copies of the student and its projection heads as they were at the best held-out check
    (a module, so a checkpoint saves and restores it with the rest)."""

    def __init__(self, student: nn.Module, heads: nn.Module):
        super().__init__()
        self.student, self.heads = copy.deepcopy(student), copy.deepcopy(heads)

    @torch.no_grad()
    def keep(self, student: nn.Module, heads: nn.Module) -> None:
        self.student.load_state_dict(student.state_dict())
        self.heads.load_state_dict(heads.state_dict())

    @torch.no_grad()
    def restore(self, student: nn.Module, heads: nn.Module) -> None:
        student.load_state_dict(self.student.state_dict())
        heads.load_state_dict(self.heads.state_dict())


def _check_targets(student: nn.Module, teacher_states: TeacherStates, batches: list[Batch],
                   cfg: DistillConfig) -> tuple[list[tuple[int, ...]], bool]:
    """The layer mapping and whether the relation loss is on, once ``teacher_states`` can serve both."""
    if not batches:
        raise KdnasError("distill: no training batches (is the split empty?)")
    mapping = layer_mapping(student.config.num_hidden_layers, teacher_states.n_layers, cfg.mapping)
    missing = {l for m in mapping for l in m} - set(teacher_states.layers) if cfg.weights.hidden_mse > 0 else set()
    if cfg.weights.pooled_cosine > 0:
        missing |= {teacher_states.n_layers} - set(teacher_states.layers)
    if missing:
        raise KdnasError(f"teacher states lack layers {sorted(missing)} needed by mapping {cfg.mapping!r}")
    relation = cfg.weights.attention_relation > 0
    if relation and teacher_states.relation_layer is None:
        raise KdnasError("distill.weights.attention_relation > 0 but teacher states were built without Q/K/V")
    return mapping, relation


def _optimiser(params: list[nn.Parameter], cfg: DistillConfig, budget: TrainBudget,
               n_batches: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """AdamW with linear warm-up and decay, and the number of steps the schedule spans."""
    lr = budget.lr or cfg.lr
    # The fused kernel updates all tensors in one pass: ~6x cheaper than the default per-tensor
    # loop on CPU, which matters because the vocabulary-sized embedding dominates the update.
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    total_steps = budget.epochs * n_batches
    if budget.max_steps:
        total_steps = min(total_steps, budget.max_steps)
    warmup = max(1, int(cfg.warmup_frac * total_steps))

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), total_steps


def _set_up(student: nn.Module, teacher_states: TeacherStates, cfg: DistillConfig, budget: TrainBudget,
            mapping: list[tuple[int, ...]], relation: bool, n_batches: int, seed: int, pooling: str = "mean") -> _Trainer:
    """Device, data parallelism, projection heads and loss, optimiser and schedule."""
    device = resolve_device(cfg.device)
    parallel = DataParallel.active()
    student.to(device)
    # Seeds the heads' initialisation here and dropout during training.
    seed_torch(seed)
    stats = teacher_states.stats if cfg.standardize_targets and cfg.weights.hidden_mse > 0 else None
    if cfg.standardize_targets and cfg.weights.hidden_mse > 0 and stats is None:
        raise KdnasError("distill.standardize_targets needs teacher-state statistics")
    loss_fn = HiddenStateDistillLoss(
        student.config.hidden_size, teacher_states.hidden, mapping, cfg.weights, stats, cfg.relation_heads, pooling
    ).to(device)
    capture = _QKVCapture(student, student.config.num_hidden_layers if relation else None)
    params = [p for p in list(student.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt, sched, total_steps = _optimiser(params, cfg, budget, n_batches)
    return _Trainer(student, loss_fn, teacher_states, capture, device, parallel, params, opt, sched, total_steps,
                    cfg.grad_clip, autocast=torch.bfloat16 if precision_name(cfg.precision, cfg.device) == "bf16" else None)


def _resume(trainer: _Trainer, checkpoint: Path | None, checkpoint_every: int, eval_states: TeacherStates,
            eval_batches: list[Batch] | None) -> _RunState:
    """The state saved in ``checkpoint`` (modules, optimiser, schedule and RNG restored in place),
    or a fresh start with the held-out loss measured before training."""
    found = find_checkpoint(checkpoint) if checkpoint is not None and checkpoint_every > 0 else None
    try:
        info = load_checkpoint(found, trainer.modules, trainer.opt, trainer.sched) if found else {}
    except UnusableCheckpoint as err:  # damaged on disk: starting over loses only time
        warnings.warn(f"{err}; starting this distillation over")
        remove_checkpoint(checkpoint)
        info = {}
    if info and info.get("total_steps") != trainer.total_steps:
        raise KdnasError(f"{found}: checkpoint is for {info.get('total_steps')} steps, this run has "
                         f"{trainer.total_steps}; delete it to start over")
    if info:
        return _RunState(info.get("step", 0), list(info.get("losses", [])), info.get("tokens", 0),
                         info.get("seconds", 0.0), info["initial_eval_loss"], list(info.get("eval_curve", [])),
                         info.get("best_step", 0), info.get("stale_checks", 0), info.get("stopped_early", False))
    if not eval_batches:
        return _RunState()
    initial = _evaluate(trainer.student, trainer.loss_fn, eval_states, eval_batches, trainer.capture)[0]
    if trainer.best is not None:
        trainer.best.keep(trainer.student, trainer.loss_fn)
    return _RunState(initial_eval_loss=initial, eval_curve=[[0, initial]])


def _train_step(trainer: _Trainer, batch: Batch) -> float:
    """One optimiser step on ``batch``; returns the batch's training loss."""
    t = trainer
    t.opt.zero_grad(set_to_none=True)
    cast = torch.autocast(t.device.type, dtype=t.autocast or torch.float32, enabled=t.autocast is not None)
    if t.parallel is None:
        with cast:
            loss, _ = _step_loss(t.student, t.loss_fn, t.teacher_states, batch, t.capture)
        loss.backward()
        value = float(loss.detach())
    else:
        part = t.parallel.shard(batch)
        loss = torch.zeros((), device=t.device)
        if len(part.index):  # a batch with fewer rows than processes leaves some idle
            with cast:
                loss, _ = _step_loss(t.student, t.loss_fn, t.teacher_states, part, t.capture,
                                     norm=(batch.n_tokens, len(batch.index)))
            loss.backward()
        value = t.parallel.sum_gradients(t.params, loss)
    torch.nn.utils.clip_grad_norm_(t.params, t.grad_clip)
    t.opt.step()
    t.sched.step()
    return value


def _train(trainer: _Trainer, run: _RunState, batches: list[Batch], seed: int,
           on_step: Callable[[int, float, float], None] | None, progress: Progress, checkpoint: Path | None,
           checkpoint_every: int) -> None:
    """Train from ``run.step`` to the end of the schedule, updating ``run`` and saving it with the
    model every ``checkpoint_every`` steps."""
    trainer.student.train()
    trainer.loss_fn.train()
    start = time.perf_counter() - run.seconds
    bar = Bar(trainer.total_steps, "distill", progress if trainer.main else False, "step", initial=run.step)
    try:
        while run.step < trainer.total_steps and not run.stopped_early:
            # Each epoch's batch order depends only on (seed, epoch): a resumed run continues
            # the same order from the middle of an epoch.
            epoch, pos = divmod(run.step, len(batches))
            order = list(range(len(batches)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            for i in order[pos:]:
                if run.step >= trainer.total_steps:
                    break
                value = _train_step(trainer, batches[i])
                if not math.isfinite(value):
                    raise KdnasError(f"distill: loss became {value} at step {run.step} (lower distill.lr?)")
                run.losses.append(value)
                run.tokens += batches[i].n_tokens
                run.step += 1
                bar.update(1, loss=value)
                if on_step is not None:
                    on_step(run.step, value, trainer.sched.get_last_lr()[0])
                if trainer.best is not None and run.step % trainer.eval_every == 0 and run.step < trainer.total_steps:
                    trainer.check(run)
                    if run.stopped_early:
                        break
                if (checkpoint is not None and checkpoint_every > 0 and run.step % checkpoint_every == 0
                        and run.step < trainer.total_steps and trainer.main):
                    run.seconds = time.perf_counter() - start
                    save_checkpoint(checkpoint, trainer.modules, trainer.opt, trainer.sched,
                                    run.info(trainer.total_steps))
        run.seconds = time.perf_counter() - start
    finally:
        bar.close()


def _result(run: _RunState, final: float | None, parts: dict[str, float]) -> DistillResult:
    tail = run.losses[-max(1, len(run.losses) // 10):]
    return DistillResult(
        initial_eval_loss=run.initial_eval_loss,
        final_eval_loss=final,
        first_train_loss=run.losses[0],
        last_train_loss=sum(tail) / len(tail),
        steps=len(run.losses),
        tokens_per_s=run.tokens / run.seconds if run.seconds > 0 else float("inf"),
        seconds=run.seconds,
        eval_parts=parts,
        loss_curve=[(i + 1, run.losses[i]) for i in range(0, len(run.losses), max(1, len(run.losses) // 200))],
        eval_curve=[(int(step), float(loss)) for step, loss in run.eval_curve],
        best_step=run.best_step if run.eval_curve else None,
        stopped_early=run.stopped_early,
    )


def held_out_loss(
    student: nn.Module,
    eval_states: TeacherStates,
    eval_batches: list[Batch],
    cfg: DistillConfig,
    *,
    init_heads: Callable[[nn.Module], None] | None = None,
    seed: int = 0,
    pooling: str = "mean",
) -> tuple[float, dict[str, float]]:
    """The held-out KD loss of ``student`` as it is, with no training step: the loss and its
    parts (``hidden_mse``, ``pooled_cosine``, ...), the heads started as ``distill`` starts them.
    For a student cut from the teacher this is a zero-cost quality signal (Minitron ranks its
    candidates by forward passes only); it equals a distillation's ``initial_eval_loss``."""
    mapping, relation = _check_targets(student, eval_states, eval_batches, cfg)
    trainer = _set_up(student, eval_states, cfg, TrainBudget(), mapping, relation, len(eval_batches), seed, pooling)
    if init_heads is not None:
        init_heads(trainer.loss_fn)
    try:
        return _evaluate(student, trainer.loss_fn, eval_states, eval_batches, trainer.capture)
    finally:
        trainer.capture.close()
        student.to("cpu")


def distill(
    student: nn.Module,
    teacher_states: TeacherStates,
    batches: list[Batch],
    cfg: DistillConfig,
    budget: TrainBudget,
    *,
    eval_batches: list[Batch] | None = None,
    eval_states: TeacherStates | None = None,
    seed: int = 0,
    on_step: Callable[[int, float, float], None] | None = None,
    progress: Progress = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    init_heads: Callable[[nn.Module], None] | None = None,
    pooling: str = "mean",
) -> DistillResult:
    """Distil ``student`` in place; returns a small, serialisable summary.

    ``pooling`` is the teacher's sentence pooling (mean, cls or max), used by the pooled term.
    ``init_heads`` starts the loss's projection heads (default: at zero); a teacher-initialised
    student starts them as its selection of the teacher's dimensions.

    ``eval_batches`` (served by ``eval_states``, default ``teacher_states``) measure the
    held-out KD loss before and after training, with the same standardisation statistics.
    With ``checkpoint`` and ``checkpoint_every`` > 0, the whole training state (weights,
    projection heads, optimiser moments, scheduler, RNG, losses) is saved every that many steps
    and a rerun resumes from it, ending where an uninterrupted run would.
    """
    mapping, relation = _check_targets(student, teacher_states, batches, cfg)
    trainer = _set_up(student, teacher_states, cfg, budget, mapping, relation, len(batches), seed, pooling)
    if init_heads is not None:  # before resuming: a checkpoint's heads replace these
        init_heads(trainer.loss_fn)
    eval_states = eval_states or teacher_states
    if budget.eval_every and eval_batches:
        trainer.best = _Best(student, trainer.loss_fn)
        trainer.eval_every, trainer.patience = budget.eval_every, budget.patience
        trainer.eval_states, trainer.eval_batches = eval_states, eval_batches
    run = _resume(trainer, checkpoint, checkpoint_every, eval_states, eval_batches)
    _train(trainer, run, batches, seed, on_step, progress, checkpoint, checkpoint_every)
    if eval_batches:
        final, parts = _evaluate(student, trainer.loss_fn, eval_states, eval_batches, trainer.capture)
        if trainer.best is not None:
            run.eval_curve.append([run.step, final])
            if final < run.best_loss:
                run.best_step = run.step
            else:  # the end is no better than the best check (perhaps the start): back to it
                trainer.best.restore(student, trainer.loss_fn)
                final, parts = _evaluate(student, trainer.loss_fn, eval_states, eval_batches, trainer.capture)
    else:
        final, parts = None, {}
    trainer.capture.close()
    student.to("cpu")  # saving, ONNX export and evaluation work on the CPU copy
    result = _result(run, final, parts)
    if trainer.loss_fn.pool_proj is not None:
        result.pooled_projection = trainer.loss_fn.pool_proj.to("cpu")
    return result
