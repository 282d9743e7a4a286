"""The KD-NAS search loop over an evaluator callback, with resumable state.

Each episode the controller proposes candidates, each candidate is evaluated (the real
evaluator distils it on the proxy set and measures its latency; tests pass a synthetic one),
its reward is computed, and at the end of the episode the controller learns from every
observation so far. The state is saved after every candidate, so an interrupted search resumes
where it stopped and, seeded, ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import pandas as pd

from kdnas_core.files.atomic import write_json
from kdnas_core.config import SearchConfig
from kdnas_core.search.controller import Controller, LatencyModel, Observation, PredictsRewards, context_for
from kdnas_core.errors import KdnasError
from kdnas_core.search.reward import Budget
from kdnas_core.search.screen import Screen, choose, pseudo_observations
from kdnas_core.search.space import StudentArch


@dataclass(frozen=True)
class Evaluation:
    """What an evaluator returns for one architecture."""

    kd_loss: float  # normalised hidden-state loss L_HS in [0, 1]
    latency_ms: float
    extra: dict = field(default_factory=dict)
    status: Literal["ok", "failed"] = "ok"
    quality: float | None = None  # the reward's quality term Q when reward.quality is not L_HS

    @property
    def quality_loss(self) -> float:
        return self.kd_loss if self.quality is None else self.quality

    @classmethod
    def failure(cls, err: BaseException) -> Evaluation:
        """A candidate that could not be evaluated (NaN loss, out of memory, export error): the
        worst loss, so its reward is the lowest the controller sees; never recommended."""
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:500]
        return cls(kd_loss=1.0, latency_ms=0.0, extra={"error": reason}, status="failed")

    @property
    def failed(self) -> bool:
        return self.status == "failed"


# A search aborts (with the last error) after this many failures in a row: then the problem is
# the set-up (teacher, data, disk), not the candidates.
MAX_CONSECUTIVE_FAILURES = 3

Evaluator = Callable[[StudentArch], Evaluation]
# Evaluates an episode's pending candidates together (e.g. fanned out as Prefect tasks).
BatchEvaluator = Callable[[list[StudentArch]], list[Evaluation]]
RewardFn = Callable[[float, float], float]


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


@dataclass
class SearchState:
    """Everything needed to continue a search: plain data, saved as JSON."""

    seed: int
    episode: int = 0
    start_episode: int = 0  # > 0 for a warm start: episodes continue the previous search's count
    pending: list[str] = field(default_factory=list)  # proposed for this episode, not yet evaluated
    pending_context: tuple[str | None, str | None] = (None, None)
    pending_predicted: dict[str, float] = field(default_factory=dict)  # arch name -> predicted reward
    pending_latency: dict[str, float] = field(default_factory=dict)  # arch name -> latency expected when proposed
    observations: list[Observation] = field(default_factory=list)
    prior: list[Observation] = field(default_factory=list)  # from a previous search (warm start)
    controller: dict = field(default_factory=dict)
    rng: list | None = None
    teacher: str = ""  # fingerprint of the teacher whose students these observations are
    # How those students started (student.init); searches from before it existed were random.
    student_init: str = "random"
    # search.screen: arch name -> zero-cost quality loss of every candidate screened so far.
    screened: dict[str, float] = field(default_factory=dict)

    @property
    def history(self) -> list[Observation]:
        return self.prior + self.observations

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "episode": self.episode,
            "start_episode": self.start_episode,
            "pending": list(self.pending),
            "pending_context": list(self.pending_context),
            "pending_predicted": dict(self.pending_predicted),
            "pending_latency": dict(self.pending_latency),
            "observations": [o.to_dict() for o in self.observations],
            "prior": [o.to_dict() for o in self.prior],
            "controller": self.controller,
            "rng": self.rng,
            "teacher": self.teacher,
            "student_init": self.student_init,
            "screened": dict(self.screened),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchState:
        return cls(
            seed=d["seed"], episode=d["episode"], start_episode=d.get("start_episode", 0),
            pending=list(d["pending"]), pending_context=tuple(d["pending_context"]),
            pending_predicted=dict(d.get("pending_predicted", {})),
            pending_latency=dict(d.get("pending_latency", {})),
            observations=[Observation.from_dict(o) for o in d["observations"]],
            prior=[Observation.from_dict(o) for o in d.get("prior", [])],
            controller=d.get("controller", {}), rng=d.get("rng"), teacher=d.get("teacher", ""),
            student_init=d.get("student_init", "random"), screened=dict(d.get("screened", {})),
        )

    def save(self, path: Path) -> Path:
        return write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: Path) -> SearchState:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise KdnasError(f"{path}: not a readable search state ({type(err).__name__}: {err})") from None

    @classmethod
    def warm_start(cls, previous: SearchState, seed: int) -> SearchState:
        """A new search that knows a previous one's results and controller weights. Known archs
        are never re-evaluated, and exploration continues from where the previous schedule was."""
        return cls(seed=seed, episode=previous.episode, start_episode=previous.episode,
                   prior=previous.history, controller=previous.controller, teacher=previous.teacher,
                   student_init=previous.student_init)


@dataclass(frozen=True)
class Recommendation:
    """The student chosen for one latency budget (``arch`` None: none fits, ``reason`` says why;
    a ``reason`` beside an arch is a note, e.g. that nothing came near the budget)."""

    budget: str
    budget_ms: float
    arch: str | None = None
    arch_id: str | None = None
    reward: float | None = None
    kd_loss: float | None = None
    latency_ms: float | None = None
    reason: str = ""
    quality: float | None = None  # the reward's quality term, when reward.quality is not L_HS

    def to_dict(self) -> dict:
        return asdict(self)


def chosen_archs(recommendations: Sequence[Recommendation]) -> list[str]:
    """Each recommended architecture once, in budget order (one student can win several budgets)."""
    return list(dict.fromkeys(r.arch for r in recommendations if r.arch))


@dataclass
class SearchResult:
    observations: list[Observation]
    leaderboard: pd.DataFrame
    pareto: pd.DataFrame
    recommendations: list[Recommendation]
    state: SearchState

    @property
    def best(self) -> Observation | None:
        return max(self.observations, key=lambda o: o.reward, default=None)


def run_search(
    controller: Controller,
    evaluate: Evaluator,
    reward_fn: RewardFn,
    cfg: SearchConfig,
    state: SearchState | None = None,
    budgets_ms: Sequence[tuple[str, float]] = (),
    on_state: Callable[[SearchState], None] | None = None,
    on_observation: Callable[[Observation], None] | None = None,
    seed: int = 0,
    evaluate_batch: BatchEvaluator | None = None,
    screen: Screen | None = None,
    latency_model: LatencyModel | None = None,
) -> SearchResult:
    """Run (or resume) ``cfg.episodes`` episodes of ``cfg.candidates_per_episode`` evaluations.

    ``evaluate`` scores one architecture at a time; pass ``evaluate_batch`` instead to score an
    episode's pending candidates together (they are recorded, and the state saved, one by one
    in proposal order either way). With ``cfg.screen`` > 0 and a ``screen``, each episode scores
    that many of the controller's candidates zero-cost and evaluates the best (``search.screen``).
    ``latency_model`` says what a candidate's latency will be, from what was measured so far (the
    screen reads it; each observation records what it expected, ``predicted_latency_ms``).
    """
    screening = _Screening(screen, reward_fn, latency_model, [ms for _, ms in budgets_ms]) \
        if screen is not None and cfg.screen else None
    state = state or SearchState(seed=seed)
    rng = random.Random(state.seed)
    if state.rng is not None:
        rng.setstate(_rng_from_json(state.rng))
    controller.load_state_dict(state.controller)
    save = on_state or (lambda s: None)
    end = state.start_episode + cfg.episodes
    while state.episode < end:
        if not state.pending and not _propose(controller, state, cfg, rng, save, screening, latency_model):
            break  # the space is exhausted
        known = {o.arch.arch_id for o in state.history}
        todo = [a for a in map(StudentArch.from_name, state.pending) if a.arch_id not in known]
        ready = dict(zip([a.arch_id for a in todo], evaluate_batch(todo))) if evaluate_batch and todo else {}
        while state.pending:
            arch = StudentArch.from_name(state.pending[0])
            known = {o.arch.arch_id for o in state.history}
            if arch.arch_id not in known:  # never evaluate an arch twice
                ev = ready.pop(arch.arch_id) if arch.arch_id in ready else _evaluate_safely(evaluate, arch)
                obs = _observation(state, arch, ev, reward_fn)
                state.observations.append(obs)
                _abort_on_failure_streak(state, min(MAX_CONSECUTIVE_FAILURES, cfg.candidates_per_episode), save)
                save(state)  # the result is on disk before anything else can go wrong
                if on_observation:
                    on_observation(obs)
            if len(state.pending) == 1:
                # The episode's last candidate: it leaves the queue in the same save that ends the
                # episode, so a crash in between cannot make a resumed search propose again.
                break
            state.pending.pop(0)
            save(state)
        _end_episode(controller, state, screening, rng, save)
    return summarize(state, budgets_ms)


def _end_episode(controller: Controller, state: SearchState, screening: _Screening | None, rng: random.Random,
                 save: Callable[[SearchState], None]) -> None:
    """The controller learns from every observation so far (and the screened candidates'
    estimates), and the next episode starts in the same save."""
    state.pending = []
    controller.update(state.history + (screening.pseudo(state) if screening else []))
    state.controller = controller.state_dict()
    state.episode += 1
    state.rng = _rng_to_json(rng.getstate())
    save(state)


@dataclass
class _Screening:
    """An episode's zero-cost screen (search.screen): its scorer and what it needs to estimate a
    candidate's reward before any training."""

    screen: Screen
    reward_fn: RewardFn
    latency_model: LatencyModel | None
    budgets_ms: list[float]

    def propose(self, controller: Controller, state: SearchState, cfg: SearchConfig, rng: random.Random,
                latency: Callable[[StudentArch], float] | None) -> list[StudentArch]:
        history = state.history
        pool = controller.propose(history, cfg.screen, rng)
        new = [a for a in pool if a.name not in state.screened]
        if new:
            state.screened.update(zip([a.name for a in new], map(float, self.screen(new))))
        predicted = controller.predicted_rewards(history, pool) if isinstance(controller, PredictsRewards) else None
        return choose(pool, state.screened, cfg.candidates_per_episode, self.reward_fn, latency, self.budgets_ms,
                      NEAR_BUDGET, predicted)

    def pseudo(self, state: SearchState) -> list[Observation]:
        latency = self.latency_model(state.history) if self.latency_model else None
        return pseudo_observations(state.history, state.screened, self.reward_fn, latency, state.episode,
                                   context_for(state.history))


def _observation(state: SearchState, arch: StudentArch, ev: Evaluation, reward_fn: RewardFn) -> Observation:
    """What the search records of an evaluated candidate: its reward (0 for a failure) and, in
    ``extra``, what the controller had predicted for it."""
    extra = dict(ev.extra)
    if arch.name in state.pending_predicted:
        extra["predicted_reward"] = state.pending_predicted[arch.name]
    if arch.name in state.pending_latency:  # the latency predictor's error, as the search saw it
        extra["predicted_latency_ms"] = state.pending_latency[arch.name]
    value = 0.0 if ev.failed else reward_fn(ev.quality_loss, ev.latency_ms)
    return Observation(arch, ev.kd_loss, ev.latency_ms, value, state.episode, state.pending_context, extra,
                       ev.status, ev.quality)


def _propose(controller: Controller, state: SearchState, cfg: SearchConfig, rng: random.Random,
             save: Callable[[SearchState], None], screening: _Screening | None = None,
             latency_model: LatencyModel | None = None) -> bool:
    """Queue the next episode's proposals (saved before any is evaluated, so a resumed search
    evaluates the same ones, and with the screen's scores, so it never screens them again);
    False when the space has nothing new left."""
    history = state.history
    latency = latency_model(history) if latency_model else None
    if screening is not None:
        proposals = screening.propose(controller, state, cfg, rng, latency)
    else:
        proposals = controller.propose(history, cfg.candidates_per_episode, rng)
    if not proposals:
        return False
    state.pending = [a.name for a in proposals]
    state.pending_context = context_for(history)
    predicted = controller.predicted_rewards(history, proposals) if isinstance(controller, PredictsRewards) else None
    state.pending_predicted = dict(zip(state.pending, predicted)) if predicted else {}
    state.pending_latency = {a.name: float(latency(a)) for a in proposals} if latency else {}
    state.rng = _rng_to_json(rng.getstate())
    save(state)
    return True


def _evaluate_safely(evaluate: Evaluator, arch: StudentArch) -> Evaluation:
    try:
        return evaluate(arch)
    except Exception as err:  # noqa: BLE001 - any candidate-specific failure is recorded, see below
        return Evaluation.failure(err)


def _abort_on_failure_streak(state: SearchState, limit: int, save: Callable[[SearchState], None]) -> None:
    """Stop when the last ``limit`` candidates of this episode all failed: then the set-up
    (teacher, data, disk, memory) is at fault, not the candidates. They go back to the queue
    unrecorded, so a rerun after the fix evaluates them instead of remembering them as failed."""
    streak = []
    for o in reversed(state.observations):
        if o.episode != state.episode or not o.failed:
            break
        streak.append(o)
    if len(streak) < limit:
        return
    streak.reverse()
    del state.observations[-len(streak):]
    state.pending = [o.arch.name for o in streak] + state.pending[1:]
    save(state)
    raise KdnasError(f"{len(streak)} candidates in a row failed, so the set-up is at fault rather than the "
                     f"candidates; last: {streak[-1].arch.name}: {streak[-1].extra.get('error')}")


# The columns people read first, in tables and reports.
SUMMARY_COLUMNS = ["rank", "arch", "arch_id", "reward", "kd_loss", "latency_ms", "episode"]


def leaderboard(observations: Sequence[Observation]) -> pd.DataFrame:
    rows = [
        {"arch": o.arch.name, "arch_id": o.arch.arch_id, "reward": o.reward, "kd_loss": o.kd_loss,
         **({"quality": o.quality} if o.quality is not None else {}), "latency_ms": o.latency_ms,
         "episode": o.episode, **o.extra}
        for o in observations
    ]
    df = pd.DataFrame(rows, columns=None if rows else ["arch", "arch_id", "reward", "kd_loss", "latency_ms", "episode"])
    df = df.sort_values(["reward", "latency_ms"], ascending=[False, True]).reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def pareto_front(observations: Sequence[Observation]) -> pd.DataFrame:
    """Candidates no other candidate beats on both quality (the reward's quality term: L_HS by
    default) and latency, fastest first."""
    observations = [o for o in observations if not o.failed]
    front = [
        o for o in observations
        if not any(
            p.quality_loss <= o.quality_loss and p.latency_ms <= o.latency_ms
            and (p.quality_loss < o.quality_loss or p.latency_ms < o.latency_ms)
            for p in observations
        )
    ]
    return leaderboard(front).sort_values("latency_ms").reset_index(drop=True)


# A budget whose pick is faster than this share of it had no candidate near it: the search
# explored too little there, and the report says so.
NEAR_BUDGET = 0.75


def recommend(observations: Sequence[Observation], budgets_ms: Sequence[tuple[str, float]]) -> list[Recommendation]:
    """The best-quality candidate (lowest quality term, L_HS by default, then fastest) within each budget. Not the best
    reward: the reward's alpha term also pays for being faster than the budget asks, which costs
    quality the user's budget allows. An impossible budget says why; a budget with no candidate
    within 25 % below it says so."""
    out = []
    for label, limit in budgets_ms:
        ok = [o for o in observations if o.latency_ms <= limit and not o.failed]
        if ok:
            b = min(ok, key=lambda o: (o.quality_loss, o.latency_ms))
            near = max(o.latency_ms for o in ok)
            note = "" if near >= NEAR_BUDGET * limit else (
                f"no candidate within 25 % below {limit:.2f} ms (slowest within it: {near:.2f} ms)")
            out.append(Recommendation(label, limit, b.arch.name, b.arch.arch_id, b.reward, b.kd_loss, b.latency_ms, note,
                                      b.quality))
        else:
            fastest = min((o for o in observations if not o.failed), key=lambda o: o.latency_ms, default=None)
            why = (f"no evaluated candidate is within {limit:.2f} ms"
                   + (f" (fastest: {fastest.arch.name} at {fastest.latency_ms:.2f} ms)" if fastest else ""))
            out.append(Recommendation(label, limit, reason=why))
    return out


def summarize(state: SearchState, budgets_ms: Sequence[tuple[str, float]] = ()) -> SearchResult:
    obs = state.observations
    # Recommendations may come from a previous search too: a warm start knows those results.
    known = state.history
    return SearchResult(obs, leaderboard(known), pareto_front(known), recommend(known, budgets_ms), state)


def budgets_in_ms(budgets: Sequence[Budget], teacher_latency_ms: float) -> list[tuple[str, float]]:
    return [(b.label, b.ms(teacher_latency_ms)) for b in budgets]
