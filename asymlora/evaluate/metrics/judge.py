"""MM-Vet scoring with a pluggable GPT-style judge.

MM-Vet has no rule-based scorer: the official evaluator asks GPT-4 to grade
each open-ended answer against the gold answer with a score in [0, 1], and
reports the mean (in percent) overall and per capability (``rec``, ``ocr``,
``know``, ``gen``, ``spat``, ``math``; a question with several capabilities
counts towards each). This module only aggregates: the grading itself must
come from a :class:`Judge` supplied by the caller. Without one,
:func:`mmvet_score` raises :class:`MissingJudgeError`; it never invents a
score.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class MissingJudgeError(RuntimeError):
    """Raised when a judge-scored benchmark is scored without a judge."""


@runtime_checkable
class Judge(Protocol):
    """Grades one answer: ``judge(question, gold, prediction) -> score in [0, 1]``.

    For results comparable with published MM-Vet numbers, implement it with
    the official MM-Vet GPT-4 grading prompt (few-shot, 0.0-1.0 scale).
    """

    def __call__(self, question: str, gold: str, prediction: str) -> float: ...


@dataclass
class JudgedItem:
    """One MM-Vet question with the model's prediction."""

    id: str
    question: str
    gold: str
    prediction: str
    capabilities: list[str] = field(default_factory=list)


def mmvet_score(items: Sequence[JudgedItem], judge: Judge | None) -> dict[str, float]:
    """Mean judge score in percent: ``total`` and one key per capability.

    Raises:
        MissingJudgeError: ``judge`` is None.
        ValueError: the judge returned something outside [0, 1] (naming the item).
    """
    if judge is None:
        raise MissingJudgeError(
            "MM-Vet is scored by an LLM judge (GPT-4 in the official evaluator) "
            "and no judge was given: pass judge=callable(question, gold, prediction) "
            "-> score in [0, 1]. asymlora does not fake judge scores.")
    if not items:
        raise ValueError("nothing to score: no predictions were given")
    scores: list[float] = []
    per_cap: dict[str, list[float]] = {}
    for item in items:
        raw = judge(item.question, item.gold, item.prediction)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"judge returned {raw!r} for item {item.id!r}; "
                             "expected a number in [0, 1]") from None
        if math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"judge returned {value!r} for item {item.id!r}; "
                             "expected a number in [0, 1]")
        scores.append(value)
        for cap in item.capabilities:
            per_cap.setdefault(cap, []).append(value)
    result = {"total": 100.0 * sum(scores) / len(scores)}
    for cap in sorted(per_cap):
        result[cap] = 100.0 * sum(per_cap[cap]) / len(per_cap[cap])
    return result
