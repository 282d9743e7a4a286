"""bench.within_budget's noise ceiling: how far evaluation noise alone caps a signal's tau."""

import numpy as np
import pytest

from bench.within_budget import noise_ceiling

pytestmark = pytest.mark.bench


def test_the_noise_ceiling_falls_as_the_summaries_become_less_certain():
    summary = np.linspace(0.4, 0.8, 10)
    exact, known, noisy, lost = (noise_ceiling(summary, np.full(10, se)) for se in (0.0, 0.02, 0.1, 0.3))
    assert exact == pytest.approx(1.0)
    assert 0.9 < known < 1.0  # SE half the gap between neighbours: neighbours swap now and then
    assert 0.5 < noisy < 0.8  # SE twice the gap: only students far apart keep their order
    assert lost < 0.4
    # students spread wider than their SE keep their order whatever the noise on the rest
    assert noise_ceiling(np.array([0.1, 0.5, 0.9]), np.full(3, 0.01)) == pytest.approx(1.0)
