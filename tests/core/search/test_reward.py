import pytest
from hypothesis import given
from hypothesis import strategies as st

from kdnas_core.errors import KdnasError
from kdnas_core.search.reward import budgeted_reward, normalised_loss, parse_budget, reward

loss = st.floats(0.0, 1.0)
lat = st.floats(0.01, 1e4)
alpha = st.floats(-2.0, -1e-3)
beta = st.floats(0.05, 2.0)


@given(loss, loss, lat, lat, alpha, beta)
def test_monotone_in_loss(l1, l2, ls, lt, a, b):
    lo, hi = sorted((l1, l2))
    assert reward(lo, ls, lt, a, b) >= reward(hi, ls, lt, a, b)


@given(loss, lat, lat, lat, alpha, beta)
def test_faster_is_better_for_negative_alpha(l, s1, s2, lt, a, b):
    fast, slow = sorted((s1, s2))
    assert reward(l, fast, lt, a, b) >= reward(l, slow, lt, a, b)


@given(loss, lat, alpha, beta)
def test_equals_one_minus_loss_at_beta_times_teacher_latency(l, lt, a, b):
    assert reward(l, b * lt, lt, a, b) == pytest.approx(1 - l)


def test_paper_defaults_value():
    # Half the reference latency is worth 2 ** 0.07 ~ +5 %.
    assert reward(0.2, 0.3, 1.0) == pytest.approx(0.8 * 0.5 ** -0.07)


def test_bad_reward_inputs():
    with pytest.raises(KdnasError, match="positive"):
        reward(0.1, 0.0, 1.0)
    with pytest.raises(KdnasError, match=r"outside \[0, 1\]"):
        reward(1.5, 1.0, 1.0)
    assert normalised_loss(1.7) == 1.0 and normalised_loss(-0.1) == 0.0


def test_budgets_parse_and_apply():
    rel, abs_ = parse_budget("0.25x"), parse_budget("30ms")
    assert rel.ms(200.0) == 50.0 and abs_.ms(200.0) == 30.0
    for bad in ("fast", "0x", "-3ms", "10 s"):
        with pytest.raises(KdnasError, match="expected a positive"):
            parse_budget(bad)
    assert budgeted_reward(0.8, 20.0, 30.0) == 0.8
    assert budgeted_reward(0.8, 40.0, 30.0) is None
    assert budgeted_reward(0.8, 40.0, 30.0, "penalize", 0.5) == 0.4
    with pytest.raises(KdnasError, match="over_budget"):
        budgeted_reward(0.8, 40.0, 30.0, "ignore")


def test_bad_budget_in_config_is_a_config_error():
    from kdnas_core.config import config_from_dict
    from kdnas_core.errors import ConfigError

    with pytest.raises(ConfigError, match="reward.*budget '3 seconds'"):
        config_from_dict({"reward": {"budgets": ["0.5x", "3 seconds"]}})
