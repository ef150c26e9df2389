"""Which of two metric values is better: the one place "max if maximize else min" is written.

A direction is ``"maximize"`` or ``"minimize"`` (or an Optuna ``StudyDirection``, read by its name). This
module imports nothing heavy: the config check, the loop, the sweep and the report all rank with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

DIRECTIONS = ("maximize", "minimize")


def direction_name(direction: Any) -> str:
    """``"maximize"`` or ``"minimize"``, from that string or an Optuna StudyDirection."""
    name = str(getattr(direction, "name", direction)).lower()
    if name not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: must be maximize or minimize")
    return name


def maximizes(direction: Any) -> bool:
    return direction_name(direction) == "maximize"


def sign(direction: Any) -> int:
    """+1 when higher is better, -1 when lower is: ``sign * value`` is a score where higher is better."""
    return 1 if maximizes(direction) else -1


def best_of(values: Iterable, direction: Any):
    """The best of ``values`` (a list, a pandas Series, dict values): max when maximizing, min otherwise."""
    return max(values) if maximizes(direction) else min(values)


def is_better(value: float, than: float | None, direction: Any) -> bool:
    """Whether ``value`` strictly beats ``than`` (anything beats None: there is no best yet)."""
    return than is None or sign(direction) * value > sign(direction) * than


def rank_key(value: float, direction: Any) -> float:
    """A sort key putting the best value first under an ascending sort."""
    return -sign(direction) * value


def ascending(direction: Any) -> bool:
    """The ``ascending=`` of a sort that puts the best value first."""
    return not maximizes(direction)
