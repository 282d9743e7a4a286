"""Per-item outcomes: an unknown metric is a one-line EvalError naming what each kind offers."""

import numpy as np
import pytest

from kdnas_core.errors import EvalError
from kdnas_core.evaluation.scoring import Clusters, Cosines, Ranks, Scores


@pytest.mark.parametrize("outcome,offers", [
    (Scores(np.array([0, 1, 1]), np.array([0, 1, 0]), 2), "accuracy, macro_f1"),
    (Ranks(np.array([0, 3, 1])), "mrr"),
    (Cosines(np.array([0.1, 0.5, 0.9]), np.array([0.0, 0.6, 1.0])), "spearman"),
    (Clusters(np.array([0, 0, 1]), np.array([0, 1, 1])), "v_measure"),
])
def test_an_unknown_metric_is_one_line_naming_the_known_ones(outcome, offers):
    assert np.isfinite(outcome.metric(outcome.primary))
    with pytest.raises(EvalError) as err:
        outcome.metric("f2")
    assert "unknown metric 'f2'" in str(err.value) and offers in str(err.value) and "\n" not in str(err.value)
