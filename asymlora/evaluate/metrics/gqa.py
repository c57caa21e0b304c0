"""GQA exact-match accuracy, as LLaVA-1.5 scores GQA testdev-balanced.

LLaVA's ``convert_gqa_for_eval.py`` turns a prediction into
``text.rstrip('.').lower()`` and the official GQA ``eval.py`` then counts a
question correct when that string equals the gold ``answer``. We also strip
surrounding whitespace first (greedy generations often end with a newline)
and lowercase / strip the gold answer (GQA gold answers already are).
"""

from __future__ import annotations

from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths, mean_percent


def normalize_gqa(text: str) -> str:
    """Strip whitespace, drop trailing periods, lowercase (LLaVA's GQA rule)."""
    return text.strip().rstrip(".").strip().lower()


def gqa_scores(predictions: Sequence[str], answers: Sequence[str],
               answer_types: Sequence[str | None] | None = None) -> dict[str, float]:
    """``{"accuracy": percent}`` plus per-type accuracy when types are given
    (e.g. the GQA structural types ``query``, ``verify``, ``logical``,
    ``choose``, ``compare``)."""
    check_lengths(predictions=predictions, answers=answers)
    correct = [float(normalize_gqa(p) == a.strip().lower())
               for p, a in zip(predictions, answers)]
    result = {"accuracy": mean_percent(correct)}
    if answer_types is not None:
        check_lengths(predictions=predictions, answer_types=answer_types)
        groups: dict[str, list[float]] = {}
        for ok, kind in zip(correct, answer_types):
            if kind is not None:
                groups.setdefault(kind, []).append(ok)
        for kind in sorted(groups):
            result[kind] = mean_percent(groups[kind])
    return result
