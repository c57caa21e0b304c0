"""MME scores, as the official ``eval_tool/calculation.py`` computes them.

* Answer parsing (``parse_mme_answer``): the response is lowercased (and
  stripped); exactly ``yes`` / ``no`` are taken as is; otherwise, if ``yes``
  occurs in its first four characters it is ``yes``, else if ``no`` occurs
  there it is ``no``, else ``other`` (always wrong).
* Per subtask: ``acc`` = percent of questions answered correctly;
  ``acc_plus`` = percent of images whose questions (two per image in MME) are
  *all* correct; ``score`` = acc + acc_plus (max 200).
* ``perception`` = sum of the scores of the 10 perception subtasks (max
  2000), ``cognition`` = sum of the 4 cognition subtasks (max 800).

Subtasks missing from the predictions are simply not summed; the keys
``perception_subtasks`` / ``cognition_subtasks`` report how many were
present so an incomplete sum cannot pass unnoticed.
"""

from __future__ import annotations

from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths

PERCEPTION_SUBTASKS = ("existence", "count", "position", "color", "posters",
                       "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation",
                      "text_translation", "code_reasoning")
MME_SUBTASKS = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS


def parse_mme_answer(response: str) -> str:
    """Map a free-form response to ``"yes"``, ``"no"`` or ``"other"``."""
    text = response.strip().lower()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(predictions: Sequence[str], answers: Sequence[str],
               subtasks: Sequence[str], image_ids: Sequence[str]) -> dict[str, float]:
    """MME metrics: ``{subtask}/acc``, ``{subtask}/acc_plus``, ``{subtask}/score``
    for every subtask present, plus ``perception``, ``cognition`` and the
    counts ``perception_subtasks`` / ``cognition_subtasks``.

    ``image_ids`` groups the questions of one image within a subtask (the
    image file name). Gold answers must be ``yes`` or ``no`` (any case).
    """
    check_lengths(predictions=predictions, answers=answers, subtasks=subtasks,
                  image_ids=image_ids)
    if not predictions:
        raise ValueError("nothing to score: no predictions were given")
    unknown = sorted(set(subtasks) - set(MME_SUBTASKS))
    if unknown:
        raise ValueError(f"unknown MME subtask(s) {unknown}; expected {list(MME_SUBTASKS)}")
    per_task: dict[str, list[bool]] = {}
    per_image: dict[tuple[str, str], list[bool]] = {}
    for i, (pred, gold, task, image) in enumerate(
            zip(predictions, answers, subtasks, image_ids)):
        gold_label = gold.strip().lower()
        if gold_label not in ("yes", "no"):
            raise ValueError(f"item {i} ({task}/{image}): gold answer {gold!r} is not yes/no")
        ok = parse_mme_answer(pred) == gold_label
        per_task.setdefault(task, []).append(ok)
        per_image.setdefault((task, image), []).append(ok)

    result: dict[str, float] = {}
    for task in MME_SUBTASKS:
        if task not in per_task:
            continue
        oks = per_task[task]
        images = [all(v) for (t, _), v in per_image.items() if t == task]
        acc = 100.0 * sum(oks) / len(oks)
        acc_plus = 100.0 * sum(images) / len(images)
        result[f"{task}/acc"] = acc
        result[f"{task}/acc_plus"] = acc_plus
        result[f"{task}/score"] = acc + acc_plus
    for name, group in (("perception", PERCEPTION_SUBTASKS),
                        ("cognition", COGNITION_SUBTASKS)):
        present = [t for t in group if t in per_task]
        result[name] = sum(result[f"{t}/score"] for t in present)
        result[f"{name}_subtasks"] = float(len(present))
    return result
