"""POPE metrics, as the official POPE / LLaVA ``eval_pope.py`` computes them.

Answer parsing (``parse_pope_answer``): keep the text before the first
period; delete commas; split on single spaces; the answer is ``no`` if one of
the words is exactly ``No``, ``no`` or ``not`` (case-sensitive, as in the
official script), otherwise ``yes``.

With ``yes`` as the positive class: accuracy = (TP+TN)/N, precision =
TP/(TP+FP), recall = TP/(TP+FN), F1 = 2PR/(P+R), yes-ratio = share of ``yes``
predictions. All are returned in percent. Where the official script would
divide by zero (no positive predictions) the value is 0.0.

When categories are given (POPE's ``random``, ``popular``, ``adversarial``
files) each category is scored on its own (keys ``{category}/{metric}``) and
the top-level metrics are the plain mean over categories, the way LLaVA-1.5
reports one POPE number.
"""

from __future__ import annotations

from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_pope_answer(response: str) -> str:
    """Official POPE parsing of a response into ``"yes"`` or ``"no"``."""
    text = response
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "no" in words or "not" in words:
        return "no"
    return "yes"


def _binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    tp = tn = fp = fn = 0
    for pred, label in zip(predictions, labels):
        pred_yes = parse_pope_answer(pred) == "yes"
        # The official script maps label 'no' -> negative and anything else -> positive.
        gold_yes = label.strip().lower() != "no"
        if pred_yes and gold_yes:
            tp += 1
        elif pred_yes:
            fp += 1
        elif gold_yes:
            fn += 1
        else:
            tn += 1
    n = tp + tn + fp + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n,
    }


def pope_scores(predictions: Sequence[str], labels: Sequence[str],
                categories: Sequence[str | None] | None = None) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes-ratio in percent.

    Without categories (or with a single one) the metrics are computed over
    all items. With several categories: ``{category}/{metric}`` per category
    and the top-level ``{metric}`` is the mean over categories.
    """
    check_lengths(predictions=predictions, labels=labels)
    if not predictions:
        raise ValueError("nothing to score: no predictions were given")
    if categories is None or len(set(categories)) <= 1:
        return _binary_metrics(predictions, labels)
    check_lengths(predictions=predictions, categories=categories)
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for pred, label, cat in zip(predictions, labels, categories):
        preds, golds = groups.setdefault(str(cat), ([], []))
        preds.append(pred)
        golds.append(label)
    result: dict[str, float] = {}
    per_cat = {cat: _binary_metrics(*groups[cat]) for cat in sorted(groups)}
    for metric in POPE_METRICS:
        result[metric] = sum(m[metric] for m in per_cat.values()) / len(per_cat)
    for cat, metrics in per_cat.items():
        for metric, value in metrics.items():
            result[f"{cat}/{metric}"] = value
    return result
