"""SNLI-VE (visual entailment) accuracy by label match.

The dataset's scorer is plain accuracy over the three ``gold_label`` values
``entailment``, ``neutral``, ``contradiction``. A generated response is
mapped to a label by ``parse_snli_ve_label``: lowercase; the label whose
stem (``entail``, ``neutral``, ``contradict``) occurs *earliest* in the
response wins (so "entailment" and "the hypothesis is entailed" -> entailment,
"contradiction" and "it contradicts" -> contradiction); no stem -> None,
which is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths, mean_percent

SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
_STEMS = {"entail": "entailment", "neutral": "neutral", "contradict": "contradiction"}


def parse_snli_ve_label(response: str) -> str | None:
    """The label a response names first, or None."""
    text = response.lower()
    hits = [(text.find(stem), label) for stem, label in _STEMS.items() if stem in text]
    return min(hits)[1] if hits else None


def snli_ve_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Percent ``accuracy`` and per-gold-class accuracy (``entailment`` ...)."""
    check_lengths(predictions=predictions, labels=labels)
    correct: list[float] = []
    per_class: dict[str, list[float]] = {}
    for i, (pred, gold) in enumerate(zip(predictions, labels)):
        gold_label = gold.strip().lower()
        if gold_label not in SNLI_VE_LABELS:
            raise ValueError(f"item {i}: gold label {gold!r} is not one of {SNLI_VE_LABELS}")
        ok = float(parse_snli_ve_label(pred) == gold_label)
        correct.append(ok)
        per_class.setdefault(gold_label, []).append(ok)
    result = {"accuracy": mean_percent(correct)}
    for label in SNLI_VE_LABELS:
        if label in per_class:
            result[label] = mean_percent(per_class[label])
    return result
