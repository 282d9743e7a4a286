"""Progress of the steps that can run for minutes: teacher states, distillation, latency
profiling, evaluation.

Each such step takes ``progress``: True draws a tqdm bar (a terminal), False shows nothing, and a
callable is handed a ``Step`` after every unit of work, so that an orchestrator can log where a
run stands (the Prefect tasks log a line every few seconds) without kdnas_core importing it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """Where one bar stands after a unit of work."""

    desc: str  # what runs, e.g. "distill", "teacher states 1a2b3c4d", "evaluate <model>"
    done: int
    total: int
    unit: str  # what is counted: "step", "batch", "task", ...
    elapsed_s: float  # since this bar started (a resumed distillation counts from its resume)
    eta_s: float | None  # from the mean rate so far; None before the first unit
    postfix: dict = field(default_factory=dict)  # e.g. {"loss": 0.41}

    def __str__(self) -> str:
        parts = [f"{self.desc}: {self.unit} {self.done}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.postfix.items()]
        if self.done < self.total and self.eta_s is not None:
            parts.append(f"ETA {duration(self.eta_s)}")
        elif self.done >= self.total:
            parts.append(f"took {duration(self.elapsed_s)}")
        return ", ".join(parts)


Report = Callable[[Step], None]
Progress = bool | Report


def duration(seconds: float) -> str:
    """``seconds`` as a log line says it: 45s, 1m20s, 2h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Bar:
    """A tqdm bar when ``progress`` is True, a ``Step`` to ``progress`` after each unit when it
    is a callable, nothing when it is False."""

    def __init__(self, total: int, desc: str, progress: Progress, unit: str = "step", initial: int = 0):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.report = progress if callable(progress) else None
        self._initial, self._start = initial, time.perf_counter()
        self._tqdm = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                          disable=self.report is not None or not progress)

    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more units done; ``postfix`` (e.g. loss=0.41) is shown beside the count."""
        self.done += n
        self._tqdm.update(n)
        if postfix:
            self._tqdm.set_postfix({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()})
        if self.report is not None:
            elapsed = time.perf_counter() - self._start
            rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else None
            self.report(Step(self.desc, self.done, self.total, self.unit, elapsed, eta, postfix))

    def close(self) -> None:
        self._tqdm.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, progress: Progress, unit: str = "step") -> Iterator[T]:
    """``items`` one by one, a unit counted once the loop body has finished with each."""
    items = list(items)
    with Bar(len(items), desc, progress, unit) as bar:
        for item in items:
            yield item
            bar.update()


def every(seconds: float, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> Report:
    """A ``Report`` that writes a step's line at most once per ``seconds`` (the first step at
    once), plus the last step of any bar that ran that long: a log shows where a long run is
    without a line per batch."""
    last = -math.inf

    def report(step: Step) -> None:
        nonlocal last
        now = clock()
        if now - last >= seconds or (step.done >= step.total and step.elapsed_s >= seconds):
            last = now
            write(str(step))

    return report


class Phases:
    """Wall time per phase of a run (teacher states, search, final distillation, evaluation),
    printed at its end so a user sees where the minutes went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        return _Timed(self, name)

    def lines(self) -> list[str]:
        total = sum(self.seconds.values())
        return [f"  {name:<20} {duration(s):>8}" for name, s in self.seconds.items()] + \
            [f"  {'total':<20} {duration(total):>8}"]


class _Timed:
    def __init__(self, phases: Phases, name: str):
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        s = self.phases.seconds
        s[self.name] = s.get(self.name, 0.0) + time.perf_counter() - self.start
