"""The search space's range check (:mod:`lora_sweep.sweep.space`) agrees with Optuna's own."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lora_sweep.sweep.space import _in_range

DISTRIBUTIONS = [
    IntDistribution(2, 16, step=2),
    IntDistribution(1, 64, log=True),
    FloatDistribution(0.0, 0.2),
    FloatDistribution(1e-4, 1e-2, log=True),
    FloatDistribution(0.0, 1.0, step=0.25),
    CategoricalDistribution(["a", "b", 4]),
]
VALUES = [-1, 0, 1, 2, 3, 4, 16, 17, 64, 65, 0.1, 0.2, 0.25, 0.3, 0.5, 1e-4, 1e-3, 0.011, 1.0, "a", "b", "c"]


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=repr)
def test_in_range_agrees_with_optuna(dist):
    for value in VALUES:
        try:
            internal = dist.to_internal_repr(value)
        except (ValueError, TypeError):
            continue
        assert _in_range(dist, internal) == dist._contains(internal), value  # Optuna's own rule, private


def test_in_range_examples():
    assert _in_range(IntDistribution(2, 16, step=2), 4) and not _in_range(IntDistribution(2, 16, step=2), 5)
    assert not _in_range(FloatDistribution(0.0, 1.0, step=0.25), 0.3)
    assert _in_range(
        CategoricalDistribution(["a", "b"]), CategoricalDistribution(["a", "b"]).to_internal_repr("b")
    )
