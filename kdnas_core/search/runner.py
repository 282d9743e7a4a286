"""A search of one config in its folder: where it starts (resume, new round, warm start), the
reward and the latency predictor (the job around it: kdnas_core.pipeline)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from kdnas_core.config import KDNASConfig
from kdnas_core.search.controller import FiltersProposals, TargetsBudgets, make_controller
from kdnas_core.errors import KdnasError
from kdnas_core.keys import key
from kdnas_core.latency import LatencyPredictor, count_flops, predictor_path
from kdnas_core.files.lock import exclusive
from kdnas_core.search.reports import write_search_tables
from kdnas_core.search.reward import budgeted_reward, parse_budget, reward
from kdnas_core.search.loop import (
    NEAR_BUDGET,
    BatchEvaluator,
    Evaluator,
    SearchResult,
    SearchState,
    budgets_in_ms,
    run_search,
)
from kdnas_core.search.screen import Screen
from kdnas_core.search.space import SearchSpace, StudentArch


def search_dir(cfg: KDNASConfig) -> Path:
    """One folder per search configuration: re-running the same config resumes it."""
    return cfg.paths.output_path() / "search" / key("search", cfg)


def make_reward_fn(cfg: KDNASConfig, teacher_ms: float, budgets: list[tuple[str, float]]):
    r = cfg.reward
    loosest = max((ms for _, ms in budgets), default=float("inf"))

    def reward_fn(l_hs: float, latency_ms: float) -> float:
        value = reward(l_hs, latency_ms, teacher_ms, r.alpha, r.beta)
        # Slower than every budget: useless to the user, so the controller learns to avoid it.
        judged = budgeted_reward(value, latency_ms, loosest, r.over_budget, r.penalty)
        return 0.0 if judged is None else judged

    return reward_fn


def initial_state(cfg: KDNASConfig, state_path: Path, warm_from: Path | None = None,
                  research: bool = False, fresh: bool = False, teacher: str = "") -> SearchState:
    state = _initial_state(cfg, state_path, warm_from, research, fresh)
    source = warm_from if warm_from is not None and not state.observations else state_path
    check_compatible(state, teacher, cfg, source)
    state.teacher = teacher or state.teacher
    state.student_init = cfg.student.init
    return state


def check_compatible(state: SearchState, teacher: str, cfg: KDNASConfig, source: Path) -> None:
    if teacher and state.teacher and state.teacher != teacher:
        raise KdnasError(f"{source}: searched with another teacher (fingerprint {state.teacher}, this config's "
                         f"teacher {cfg.teacher.name!r} is {teacher}); its rewards do not apply here "
                         "(use --fresh, or warm-start from a search of this teacher)")
    if state.history and state.student_init != cfg.student.init:
        raise KdnasError(f"{source}: searched with student.init = {state.student_init!r}, this config has "
                         f"{cfg.student.init!r}; its rewards do not apply here (use --fresh, or warm-start from a "
                         "search with the same student.init)")


def drop_prior_outside(state: SearchState, space: SearchSpace) -> None:
    """A warm start's known results that this space no longer allows (a config edit, or a cap
    added since) could be recommended but not distilled: they are left out, said in one line."""
    outside = [o.arch.name for o in state.prior if o.arch not in space]
    if outside:
        warnings.warn(f"{len(outside)} known results of the warm start lie outside this search space and are "
                      f"not used (e.g. {outside[0]})")
        state.prior = [o for o in state.prior if o.arch in space]


def _initial_state(cfg: KDNASConfig, state_path: Path, warm_from: Path | None = None,
                   research: bool = False, fresh: bool = False) -> SearchState:
    """Where a search starts: an interrupted run of this config resumes; a finished one is
    shown again, or, with ``research`` (scheduled re-searches), continued by a new round that
    warm-starts from it; ``warm_from`` seeds a new search with another search's state."""
    if state_path.is_file() and not fresh:
        state = SearchState.load(state_path)
        finished = state.episode >= state.start_episode + cfg.search.episodes and not state.pending
        if finished and research:
            # A new seed per round, so each re-search explores differently.
            return SearchState.warm_start(state, seed=cfg.seed + state.episode)
        return state
    if warm_from is not None:
        return SearchState.warm_start(SearchState.load(warm_from), cfg.seed)
    return SearchState(seed=cfg.seed)


def attach_latency_predictor(controller, cfg: KDNASConfig, budgets: list[tuple[str, float]]) -> LatencyPredictor | None:
    """Reuse this hardware's latency predictor (if an earlier search saved one) to keep the
    controller's pool within the loosest budget: archs predicted slower than every budget are
    worthless when over-budget candidates are excluded."""
    path = predictor_path(cfg.paths.cache_path(), cfg.latency)
    if not path.is_file() or not budgets or cfg.reward.over_budget != "exclude" or not isinstance(controller, FiltersProposals):
        return None
    pred = LatencyPredictor.load(path)
    loosest = max(ms for _, ms in budgets)
    controller.set_feasible(lambda a: pred.predict(a) <= loosest)
    return pred


def budget_latency_model(cfg: KDNASConfig):
    """What a candidate's latency will be, for proposing near each budget: a predictor fitted on
    this search's own measurements once there are three. Not this machine's saved predictor: the
    proposals would then depend on what other searches left on disk, and a rerun of the same
    config would not propose the same candidates."""
    b, s = cfg.latency.reward_shape

    def model(history):
        measured = [o for o in history if o.latency_ms > 0 and not o.failed]
        if len(measured) < 3:
            return None
        return LatencyPredictor.fit([o.arch for o in measured], [o.latency_ms for o in measured], b, s,
                                    cfg.latency.reward_backend).predict

    return model


def screen_latency_model(cfg: KDNASConfig, space: SearchSpace, teacher_ms: float):
    """``budget_latency_model``, and before it has three measurements a FLOPs share of the
    teacher's latency: the screen of the first episode must already tell which candidates fit a
    budget, or it would pick the largest (best-scoring) students, all over every budget."""
    fitted = budget_latency_model(cfg)
    b, s = cfg.latency.reward_shape
    t = space.teacher
    teacher_flops = count_flops(StudentArch(t.layers, t.hidden, 1, t.ffn, "gelu"), b, s)["total"] if t else None

    def model(history):
        measured = fitted(history)
        if measured is not None or teacher_flops is None:
            return measured
        return lambda a: teacher_ms * count_flops(a, b, s)["total"] / teacher_flops

    return model


def update_latency_predictor(cfg: KDNASConfig, observations, hardware: str = "") -> Path | None:
    """Refit the predictor on every measured latency so far and save it for later searches."""
    measured = [o for o in observations if o.latency_ms > 0]
    if len(measured) < 3:
        return None
    b, s = cfg.latency.reward_shape
    pred = LatencyPredictor.fit([o.arch for o in measured], [o.latency_ms for o in measured], b, s,
                                cfg.latency.reward_backend, hardware)
    return pred.save(predictor_path(cfg.paths.cache_path(), cfg.latency))


def search_in_folder(
    cfg: KDNASConfig,
    space: SearchSpace,
    teacher_ms: float,
    evaluate: Evaluator | None = None,
    evaluate_batch: BatchEvaluator | None = None,
    warm_from: Path | None = None,
    fresh: bool = False,
    research: bool = False,
    on_observation=None,
    teacher: str = "",
    screen: Screen | None = None,
) -> SearchResult:
    """The search of one config in its folder (``search_dir``): find where it starts, run the
    episodes with the given evaluator (and, with search.screen, the zero-cost ``screen``), write
    the tables and refit the latency predictor. The plain loop and the Prefect flow differ only
    in the evaluator and screen they pass."""
    out = search_dir(cfg)
    state_path = out / "state.json"
    budgets = budgets_in_ms([parse_budget(x) for x in cfg.reward.budgets], teacher_ms)
    with exclusive(out, f"the search of this config ({out})"):
        if fresh:
            shutil.rmtree(out / "evals", ignore_errors=True)
        state = initial_state(cfg, state_path, warm_from, research, fresh, teacher)
        drop_prior_outside(state, space)
        # The controller's pool is what the screen scores: at least search.screen candidates.
        ccfg = cfg.controller.model_copy(update={"pool_size": max(cfg.controller.pool_size, cfg.search.screen)})
        controller = make_controller(space, ccfg, cfg.seed)
        attach_latency_predictor(controller, cfg, budgets)
        if isinstance(controller, TargetsBudgets) and budgets:
            controller.set_budget_targets([ms for _, ms in budgets], budget_latency_model(cfg), NEAR_BUDGET)
        result = run_search(controller, evaluate, make_reward_fn(cfg, teacher_ms, budgets), cfg.search, state,
                            budgets, on_state=lambda st: st.save(state_path), on_observation=on_observation,
                            seed=state.seed, evaluate_batch=evaluate_batch, screen=screen,
                            latency_model=screen_latency_model(cfg, space, teacher_ms))
        write_search_tables(result, out, teacher_ms)
        update_latency_predictor(cfg, result.state.history)
    return result
