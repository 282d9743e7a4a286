"""Student architectures and the space KD-NAS searches.

A ``StudentArch`` is the five numbers that define a BERT-style encoder student. Its ``arch_id``
(a short sha1 of the canonical form) is the key for runs, artifact paths and caches, so the same
architecture is never trained twice by accident.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import asdict, dataclass
from typing import Iterator

from kdnas_core.config import SearchSpaceConfig
from kdnas_core.errors import ArchError

ACTIVATIONS = ("gelu", "relu", "silu")
# transformers' names for the same functions ("swish" is its older name for silu).
_HF_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_NAME_RE = re.compile(r"^L(\d+)-H(\d+)-A(\d+)-F(\d+)-(\w+)$")


@dataclass(frozen=True, order=True)
class StudentArch:
    layers: int
    hidden: int
    heads: int
    ffn: int
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "ffn"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ArchError(f"arch.{field} = {value!r}: expected a positive integer")
        if self.hidden % self.heads:
            raise ArchError(
                f"arch.hidden = {self.hidden} is not divisible by arch.heads = {self.heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ArchError(
                f"arch.activation = {self.activation!r}: expected one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def name(self) -> str:
        """Readable form, e.g. ``L4-H384-A6-F1536-gelu``; parses back with ``from_name``."""
        return f"L{self.layers}-H{self.hidden}-A{self.heads}-F{self.ffn}-{self.activation}"

    @property
    def arch_id(self) -> str:
        # The canonical form is the readable name: field order and spelling are fixed, so the id
        # is stable across processes and Python versions (unlike hash()).
        return hashlib.sha1(self.name.encode()).hexdigest()[:10]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StudentArch:
        unknown = set(data) - {"layers", "hidden", "heads", "ffn", "activation"}
        if unknown:
            raise ArchError(f"arch has unknown keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> StudentArch:
        m = _NAME_RE.match(name.strip())
        shown = repr(name) if len(name) <= 60 else f"{name[:40]!r}... ({len(name)} characters)"
        if not m:
            raise ArchError(
                f"arch {shown}: expected L<layers>-H<hidden>-A<heads>-F<ffn>-<activation>, "
                "e.g. L4-H384-A6-F1536-gelu"
            )
        layers, hidden, heads, ffn, act = m.groups()
        # Python refuses to convert integers of over 4,300 digits, and no encoder has a
        # dimension of ten digits: the one line comes before either.
        for field, digits in zip(("layers", "hidden", "heads", "ffn"), (layers, hidden, heads, ffn)):
            if len(digits) > 9:
                raise ArchError(f"arch {shown}: {field} has {len(digits)} digits; expected a positive integer "
                                "below 10^9")
        return cls(int(layers), int(hidden), int(heads), int(ffn), act)

    def __str__(self) -> str:
        return self.name


def activation_named(hidden_act) -> str | None:
    """The student activation that computes a config's ``hidden_act``; None when there is none
    (a tanh-approximated gelu, a callable) rather than a near match."""
    return _HF_ACTIVATIONS.get(hidden_act) if isinstance(hidden_act, str) else None


@dataclass(frozen=True)
class TeacherShape:
    """What the search space needs to know about the teacher to cap students to it."""

    layers: int
    hidden: int
    ffn: int
    head_dim: int | None = None  # hidden / attention heads
    activation: str | None = None  # None when it is none of ACTIVATIONS (e.g. gelu_new)


class SearchSpace:
    """The discrete set of valid students: every combination whose hidden size divides by heads.

    With a ``teacher``, choices larger than it are dropped (``cap_to_teacher``). When students are
    cut from it (``inherits``), heads wider than the teacher's (``cap_head_width``) and other
    activations than the teacher's (``cap_activation``) are dropped too."""

    def __init__(self, cfg: SearchSpaceConfig, teacher: TeacherShape | None = None, inherits: bool = False):
        self.cfg = cfg
        self.teacher = teacher
        cut = inherits and teacher is not None
        self.max_head_dim = teacher.head_dim if cut and cfg.cap_head_width else None
        cap = teacher is not None and cfg.cap_to_teacher
        self.layers = sorted(v for v in set(cfg.layers) if not cap or v <= teacher.layers)
        self.hidden = sorted(v for v in set(cfg.hidden) if not cap or v <= teacher.hidden)
        self.ffn = sorted(v for v in set(cfg.ffn) if not cap or v <= teacher.ffn)
        self.heads = sorted(set(cfg.heads))
        self.activation = sorted(set(cfg.activation))
        self.activation_capped = cut and cfg.cap_activation and teacher.activation is not None
        if self.activation_capped:
            if teacher.activation not in self.activation:
                raise ArchError(
                    f"search_space.activation: {self.activation} leaves out the teacher's {teacher.activation}, "
                    "the only one students cut from it keep (cap_activation); add it or set cap_activation: false"
                )
            self.activation = [teacher.activation]
        for field in ("layers", "hidden", "ffn"):
            if not getattr(self, field):
                raise ArchError(
                    f"search_space.{field}: no choice left after capping to the teacher "
                    f"({teacher}); allow smaller values or set cap_to_teacher: false"
                )
        if not any(self.heads_for(h) for h in self.hidden):
            if self.max_head_dim and any(h % a == 0 for h in self.hidden for a in self.heads):
                raise ArchError(
                    f"search_space.heads: every choice makes heads wider than the teacher's ({self.max_head_dim}), "
                    "which students cut from it cannot inherit; add more heads or set cap_head_width: false"
                )
            raise ArchError("search_space: no hidden size is divisible by any heads choice")

    def heads_for(self, hidden: int) -> list[int]:
        return [a for a in self.heads if hidden % a == 0 and (not self.max_head_dim or hidden // a <= self.max_head_dim)]

    def __iter__(self) -> Iterator[StudentArch]:
        for layers, hidden, ffn, act in itertools.product(
            self.layers, self.hidden, self.ffn, self.activation
        ):
            for heads in self.heads_for(hidden):
                yield StudentArch(layers, hidden, heads, ffn, act)

    def __len__(self) -> int:
        n_hidden_heads = sum(len(self.heads_for(h)) for h in self.hidden)
        return len(self.layers) * n_hidden_heads * len(self.ffn) * len(self.activation)

    def __contains__(self, arch: StudentArch) -> bool:
        return (
            arch.layers in self.layers
            and arch.hidden in self.hidden
            and arch.heads in self.heads_for(arch.hidden)
            and arch.ffn in self.ffn
            and arch.activation in self.activation
        )

    def validate(self, arch: StudentArch) -> StudentArch:
        """Raise a one-line error when ``arch`` lies outside this space (e.g. bigger than allowed)."""
        for field in ("layers", "hidden", "heads", "ffn", "activation"):
            allowed = getattr(self, field)
            value = getattr(arch, field)
            if value not in allowed:
                why = " (capped to the teacher)" if self.teacher and self.cfg.cap_to_teacher else ""
                if field == "activation" and self.activation_capped:
                    why = " (the teacher's, which students cut from it keep: search_space.cap_activation)"
                raise ArchError(
                    f"arch {arch.name}: {field} = {value} is not allowed in this search space"
                    f"{why}; allowed: {allowed}"
                )
        if arch.heads not in self.heads_for(arch.hidden):
            raise ArchError(
                f"arch {arch.name}: heads = {arch.heads} makes each head {arch.hidden // arch.heads} wide, wider than "
                f"the teacher's {self.max_head_dim}, which a student cut from it cannot inherit "
                f"(search_space.cap_head_width); allowed at hidden {arch.hidden}: {self.heads_for(arch.hidden)}"
            )
        return arch

    def sample(self, rng: random.Random) -> StudentArch:
        hidden = rng.choice(self.hidden)
        heads_choices = self.heads_for(hidden)
        while not heads_choices:  # some hidden sizes may admit no heads choice
            hidden = rng.choice(self.hidden)
            heads_choices = self.heads_for(hidden)
        return StudentArch(
            layers=rng.choice(self.layers),
            hidden=hidden,
            heads=rng.choice(heads_choices),
            ffn=rng.choice(self.ffn),
            activation=rng.choice(self.activation),
        )

    def mutate(self, arch: StudentArch, rng: random.Random) -> StudentArch:
        """Change one field to a different allowed value (heads re-drawn if hidden changes)."""
        fields = [
            f
            for f in ("layers", "hidden", "heads", "ffn", "activation")
            if len(self._choices(f, arch)) > 1
        ]
        new = arch.to_dict()
        if fields:
            field = rng.choice(fields)
            new[field] = rng.choice([v for v in self._choices(field, arch) if v != getattr(arch, field)])
        # Re-draw what no longer fits: heads when hidden moved, or any field of a parent from a
        # search whose space allowed more (a warm start from before a cap).
        for f in ("layers", "hidden", "ffn", "activation"):
            if new[f] not in self._choices(f, arch):
                new[f] = rng.choice(self._choices(f, arch))
        if new["heads"] not in self.heads_for(new["hidden"]):
            new["heads"] = rng.choice(self.heads_for(new["hidden"]))
        return StudentArch(**new)

    def _choices(self, field: str, arch: StudentArch) -> list:
        if field == "heads":
            return self.heads_for(arch.hidden)
        if field == "hidden":
            return [h for h in self.hidden if self.heads_for(h)]
        return getattr(self, field)
