"""Small helpers shared by the metric modules."""

from __future__ import annotations

from collections.abc import Sequence


def check_lengths(**sequences: Sequence) -> None:
    """Raise ValueError naming the arguments if the sequences differ in length."""
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"length mismatch: {detail}")


def mean_percent(values: Sequence[float]) -> float:
    """Mean of values in [0, 1], times 100 (ValueError when there are none)."""
    if not values:
        raise ValueError("nothing to score: no predictions were given")
    return 100.0 * sum(values) / len(values)
