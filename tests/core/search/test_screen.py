"""The zero-cost screen (search.screen) and the reward's quality term (reward.quality) on a
synthetic problem with a known optimum: no models, seconds to run."""

import random
import statistics

import pytest

from kdnas_core.config import ControllerConfig, SearchConfig, SearchSpaceConfig
from kdnas_core.search.controller import LSTMRewardController, Observation, make_controller
from kdnas_core.search.loop import Evaluation, SearchState, recommend, run_search
from kdnas_core.search.reward import reward
from kdnas_core.search.screen import calibration, choose, pseudo_observations
from kdnas_core.search.space import SearchSpace, StudentArch
from kdnas_core.search.synthetic import additive_landscape

SPACE = SearchSpace(SearchSpaceConfig())
TEACHER_MS = 300.0
BUDGET = ("10ms", 10.0)


def reward_fn(q, latency):
    return reward(q, latency, TEACHER_MS)


def latency_of(arch: StudentArch) -> float:
    return additive_landscape(SPACE)(arch).latency_ms  # the synthetic latency does not depend on the seed


def noisy_screen(evaluate, noise: float, seed: int, calls: list | None = None):
    """A zero-cost signal that ranks like the true quality, with per-arch noise (the same arch
    always scores the same, as a real screen of the same student does)."""

    def screen(archs):
        if calls is not None:
            calls.extend(a.name for a in archs)
        return [min(1.0, max(0.0, evaluate(a).kd_loss + random.Random(f"{seed}-{a.arch_id}").gauss(0, noise)))
                for a in archs]

    return screen


def best_within_budget(seed: int, screened: bool, kind: str = "random") -> float:
    evaluate = additive_landscape(SPACE, seed)
    ctrl = make_controller(SPACE, ControllerConfig(kind=kind, pool_size=200), seed=seed)
    cfg = SearchConfig(episodes=3, candidates_per_episode=4, screen=200 if screened else 0)
    res = run_search(ctrl, evaluate, reward_fn, cfg, budgets_ms=[BUDGET], seed=seed,
                     screen=noisy_screen(evaluate, 0.03, seed) if screened else None,
                     latency_model=lambda history: latency_of)
    assert len(res.observations) == 12  # the same number of proxy evaluations either way
    rec = res.recommendations[0]
    return rec.kd_loss if rec.arch else 1.0


@pytest.mark.parametrize("kind", ["random", "lstm"])
def test_screening_hundreds_finds_a_better_student_within_the_budget_at_equal_evaluations(kind):
    seeds = range(5)
    screened = statistics.mean(best_within_budget(s, True, kind) for s in seeds)
    plain = statistics.mean(best_within_budget(s, False, kind) for s in seeds)
    assert screened < plain - 0.02, (screened, plain)


def test_a_screened_search_resumes_without_screening_again(tmp_path):
    evaluate = additive_landscape(SPACE, 0)

    def run(state=None, on_state=None, evaluate_fn=evaluate, calls=None):
        ctrl = LSTMRewardController(SPACE, ControllerConfig(pool_size=50, epsilon_decay=0.4, train_epochs=30), seed=0)
        return run_search(ctrl, evaluate_fn, reward_fn, SearchConfig(episodes=3, candidates_per_episode=3, screen=50),
                          state=state, on_state=on_state, budgets_ms=[BUDGET], seed=0,
                          screen=noisy_screen(evaluate, 0.03, 0, calls), latency_model=lambda h: latency_of)

    full = run()
    path, done = tmp_path / "state.json", []

    def crashing(arch):
        if len(done) == 4:
            raise KeyboardInterrupt("simulated crash")
        done.append(arch.name)
        return evaluate(arch)

    with pytest.raises(KeyboardInterrupt):
        run(on_state=lambda s: s.save(path), evaluate_fn=crashing)
    state = SearchState.load(path)
    assert len(state.screened) >= 50  # the scores are saved with the episode's proposals
    again: list[str] = []
    resumed = run(state=state, calls=again)
    assert [o.arch.name for o in resumed.observations] == [o.arch.name for o in full.observations]
    assert not set(again) & set(SearchState.load(path).screened)  # nothing screened twice


def test_choose_puts_a_candidate_near_every_budget_then_the_best_estimates():
    archs = [StudentArch.from_name(n) for n in
             ("L1-H128-A2-F512-gelu", "L2-H256-A4-F512-gelu", "L4-H384-A6-F1536-gelu", "L6-H768-A12-F3072-gelu")]
    latency = {a.arch_id: ms for a, ms in zip(archs, (2.0, 5.0, 9.0, 40.0))}
    screened = {archs[0].name: 0.5, archs[1].name: 0.4, archs[2].name: 0.3, archs[3].name: 0.1}
    picks = choose(archs, screened, 2, reward_fn, lambda a: latency[a.arch_id], budgets_ms=[6.0, 10.0])
    # 5 ms lies in [0.75, 0.95] x 6 ms and 9 ms in that band of 10 ms: one each, whatever scores best overall.
    assert picks == [archs[1], archs[2]]
    # Without a latency model the screen ranks by quality alone.
    assert choose(archs, screened, 2, reward_fn)[0] == archs[3]


def test_pseudo_observations_follow_a_line_fitted_on_distilled_candidates():
    archs = [StudentArch.from_name(f"L{n}-H256-A4-F512-gelu") for n in (1, 2, 3, 4, 6)]
    screened = {a.name: 0.1 * i for i, a in enumerate(archs)}
    history = [Observation(a, 0.2 + 0.5 * screened[a.name], 5.0, 0.0, 0) for a in archs[:3]]
    to_proxy = calibration(history, screened)
    assert to_proxy(0.4) == pytest.approx(0.4)
    assert calibration(history[:2], screened) is None  # two points are not a calibration
    pseudo = pseudo_observations(history, screened, reward_fn, lambda a: 5.0, 1, (None, None))
    assert [p.arch for p in pseudo] == archs[3:]  # only what was never distilled
    assert [p.kd_loss for p in pseudo] == pytest.approx([0.35, 0.4])
    assert all(p.extra["screened"] and p.reward == pytest.approx(reward_fn(p.kd_loss, 5.0)) for p in pseudo)


def test_the_reward_and_the_recommendation_follow_the_quality_term():
    """reward.quality: the search ranks by the configured signal, not by L_HS, when they disagree."""
    archs = [StudentArch.from_name(n) for n in ("L2-H256-A4-F512-gelu", "L3-H256-A4-F512-gelu")]
    table = {archs[0].arch_id: (0.2, 0.6), archs[1].arch_id: (0.4, 0.3)}  # (L_HS, quality)

    def evaluate(arch):
        l_hs, q = table[arch.arch_id]
        return Evaluation(l_hs, 5.0, quality=q)

    class Fixed:
        def propose(self, history, k, rng):
            return [a for a in archs if a.arch_id not in {o.arch.arch_id for o in history}][:k]

        def update(self, history):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    res = run_search(Fixed(), evaluate, reward_fn, SearchConfig(episodes=1, candidates_per_episode=2), budgets_ms=[BUDGET])
    by = {o.arch.arch_id: o for o in res.observations}
    assert by[archs[1].arch_id].reward == pytest.approx(reward_fn(0.3, 5.0))
    assert res.recommendations[0].arch == archs[1].name and res.recommendations[0].quality == pytest.approx(0.3)
    assert recommend(res.observations, [BUDGET])[0].kd_loss == pytest.approx(0.4)  # L_HS still reported


def test_each_observation_records_the_latency_expected_when_it_was_proposed(tmp_path):
    """The latency predictor's error as the search saw it (issue: proposals near every budget),
    in the leaderboard and as a line of the search's report."""
    from kdnas_core.search.reports import predictor_lines

    evaluate = additive_landscape(SPACE, 0)
    half = lambda history: (lambda a: 0.5 * latency_of(a)) if len(history) >= 3 else None  # noqa: E731
    ctrl = make_controller(SPACE, ControllerConfig(kind="random"), seed=0)
    res = run_search(ctrl, evaluate, reward_fn, SearchConfig(episodes=2, candidates_per_episode=3), seed=0,
                     latency_model=half)
    first, second = res.observations[:3], res.observations[3:]
    assert all("predicted_latency_ms" not in o.extra for o in first)  # nothing measured yet
    assert [o.extra["predicted_latency_ms"] for o in second] == pytest.approx([0.5 * o.latency_ms for o in second])
    line = predictor_lines(res.leaderboard)[0]
    assert "median 50% over 3 candidates" in line
