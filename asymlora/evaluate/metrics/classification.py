"""Image classification by label match (CIFAR-10/100, MNIST style).

There is no official scorer for generative classification; the rule used
here, applied to prediction and gold label after ``normalize_label``
(lowercase, ``_`` and ``-`` -> space, other punctuation dropped, whitespace
collapsed, number words ``zero``..``nine`` -> digits so MNIST "seven" == "7"):

1. correct if the normalised prediction equals the normalised gold label;
2. otherwise correct if the gold label occurs in the prediction as a whole
   word sequence (``"it is a maple tree"`` contains ``"maple tree"``) and no
   *other* label of the label set also occurs in it; labels that are part of
   the gold label itself are ignored, so ``"maple tree"`` is not penalised
   for containing the label ``"tree"``, while ``"a cat or a dog"`` is wrong
   for gold ``cat``. Without a label set, rule 2 is plain whole-word
   containment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths, mean_percent

_DIGIT_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"}


def normalize_label(text: str) -> str:
    """Lowercase, ``_``/``-`` -> space, drop other punctuation, digit words -> digits."""
    text = text.lower().replace("_", " ").replace("-", " ")
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(_DIGIT_WORDS.get(w, w) for w in text.split())


def _contains(haystack: str, needle: str) -> bool:
    return f" {needle} " in f" {haystack} "


def label_matches(prediction: str, gold: str, label_set: Sequence[str] | None = None) -> bool:
    """True when ``prediction`` names ``gold`` under the module's rule."""
    pred, target = normalize_label(prediction), normalize_label(gold)
    if not target:
        raise ValueError(f"gold label {gold!r} is empty after normalisation")
    if pred == target:
        return True
    if not _contains(pred, target):
        return False
    for other in label_set or ():
        other_n = normalize_label(other)
        if other_n and other_n != target and not _contains(target, other_n) \
                and _contains(pred, other_n):
            return False
    return True


def classification_scores(predictions: Sequence[str], labels: Sequence[str],
                          label_set: Sequence[str] | None = None) -> dict[str, float]:
    """``{"accuracy": percent}`` by :func:`label_matches`."""
    check_lengths(predictions=predictions, labels=labels)
    correct = [float(label_matches(p, g, label_set)) for p, g in zip(predictions, labels)]
    return {"accuracy": mean_percent(correct)}
