"""VizWiz-VQA accuracy per answer type and their plain average.

The per-question accuracy is the official VQA accuracy (see
:mod:`asymlora.evaluate.metrics.vqa`; the VizWiz evaluation code is a fork of
the VQA one with the same normalisation and 9-of-10 averaging). VizWiz
annotations give each question an ``answer_type`` among ``yes/no``,
``number``, ``other`` and ``unanswerable``. The AsymLoRA tables report the
accuracy of each type and their *unweighted* mean ("average"); the official
overall accuracy (mean over all questions) is reported too as ``accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths
from asymlora.evaluate.metrics.vqa import vqa_scores

VIZWIZ_ANSWER_TYPES = ("yes/no", "number", "other", "unanswerable")


def vizwiz_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                  answer_types: Sequence[str]) -> dict[str, float]:
    """Percent accuracies: ``yes/no``, ``number``, ``other``, ``unanswerable``,
    ``average`` (plain mean of the types present) and ``accuracy`` (overall).

    Raises ValueError for an answer type outside the four VizWiz types.
    """
    check_lengths(predictions=predictions, references=references,
                  answer_types=answer_types)
    for i, kind in enumerate(answer_types):
        if kind not in VIZWIZ_ANSWER_TYPES:
            raise ValueError(f"item {i}: answer_type {kind!r} is not one of "
                             f"{', '.join(VIZWIZ_ANSWER_TYPES)}")
    scores = vqa_scores(predictions, references, answer_types)
    present = [scores[k] for k in VIZWIZ_ANSWER_TYPES if k in scores]
    result = {k: scores[k] for k in VIZWIZ_ANSWER_TYPES if k in scores}
    result["average"] = sum(present) / len(present)
    result["accuracy"] = scores["accuracy"]
    return result
