"""Multi-layer hidden-state distillation (KD-NAS, Trivedi et al. 2023), plus the teacher-state cache.

Each student hidden state (index 0 = embeddings, i = output of layer i) learns from one or more
teacher hidden states through a learned linear projection from the student's width to the
teacher's. The default "uniform + last" mapping pairs student layer i with teacher layers
``i * (L_T // L_S)`` and ``L_T - L_S + i``.

What the paper leaves open and the distillation pilot (docs/distillation.md)
settled: targets are standardised per teacher layer and dimension (raw MSE is dominated by a
few huge dimensions and transfers nothing), and a pooled-output cosine term carries the sentence
embedding of a sentence-embedding teacher. Both are config.

The package: ``mapping`` (layer mappings), ``targets`` (what a student learns from), ``cache``
(the teacher-state cache), ``losses`` and ``trainer`` (``distill``); every name is importable
from ``kdnas_core.distill``.
"""

from __future__ import annotations

from kdnas_core.distill.mapping import MAPPINGS, layer_mapping, teacher_layers_needed
from kdnas_core.distill.targets import (
    CorruptCache,
    LayerStats,
    LiveTeacherStates,
    PooledTeacherStates,
    SharedStates,
    SourceTargets,
    Targets,
    TeacherStates,
    compute_stats,
    pooled_only,
    source_embeddings,
    teacher_pooled,
)
from kdnas_core.distill.cache import (
    CachedTeacherStates,
    cache_bytes,
    cache_plan,
    make_teacher_states,
    teacher_embeddings,
)
from kdnas_core.distill.losses import HiddenStateDistillLoss, relation_kl
from kdnas_core.distill.trainer import DataParallel, DistillResult, distill, held_out_loss
from kdnas_core.hardware import resolve_device

__all__ = [
    "CachedTeacherStates",
    "CorruptCache",
    "DataParallel",
    "DistillResult",
    "HiddenStateDistillLoss",
    "LayerStats",
    "LiveTeacherStates",
    "MAPPINGS",
    "PooledTeacherStates",
    "SharedStates",
    "SourceTargets",
    "Targets",
    "TeacherStates",
    "cache_bytes",
    "cache_plan",
    "compute_stats",
    "distill",
    "held_out_loss",
    "layer_mapping",
    "make_teacher_states",
    "pooled_only",
    "relation_kl",
    "resolve_device",
    "source_embeddings",
    "teacher_embeddings",
    "teacher_layers_needed",
    "teacher_pooled",
]
