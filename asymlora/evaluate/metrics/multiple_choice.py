"""Multiple-choice accuracy, ScienceQA style (LLaVA ``eval_science_qa.py``).

Letter extraction (``extract_choice_letter``), applied to the stripped
response, in this order:

1. the whole response is an option letter (``"B"``);
2. the response starts with a letter followed by ``". "`` (``"B. cat"``);
3. the pattern ``The answer is X.`` occurs exactly once (``X`` any capital
   letter, followed by any character, as the official regex does).

Anything else (including a letter beyond the number of choices) is a failed
parse and counts as wrong; the official script does the same (its random
fallback is dead code). Note that a bare ``"B."`` is a failed parse there
too, and is one here.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from asymlora.evaluate.metrics._common import check_lengths, mean_percent

_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def option_letters(num_choices: int) -> str:
    """The letters used for ``num_choices`` options: ``"ABC"`` for 3."""
    if not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be in 1..26, got {num_choices}")
    return string.ascii_uppercase[:num_choices]


def extract_choice_letter(response: str, num_choices: int) -> str | None:
    """The option letter a response picks, or None when it cannot be parsed."""
    text = response.strip()
    letters = option_letters(num_choices)
    if len(text) == 1 and text in string.ascii_uppercase:
        letter = text
    elif len(text) >= 3 and text[0] in string.ascii_uppercase and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in letters else None


def multiple_choice_scores(predictions: Sequence[str], answers: Sequence[str],
                           num_choices: Sequence[int],
                           has_image: Sequence[bool] | None = None) -> dict[str, float]:
    """Percent ``accuracy``; with ``has_image`` also ``img_accuracy`` (the
    ScienceQA-IMG number LLaVA reports) and ``no_img_accuracy``.

    ``answers`` are gold letters (``"A"``...).
    """
    check_lengths(predictions=predictions, answers=answers, num_choices=num_choices)
    correct = [float(extract_choice_letter(p, n) == a.strip().upper())
               for p, a, n in zip(predictions, answers, num_choices)]
    result = {"accuracy": mean_percent(correct)}
    if has_image is not None:
        check_lengths(predictions=predictions, has_image=has_image)
        with_img = [c for c, img in zip(correct, has_image) if img]
        without = [c for c, img in zip(correct, has_image) if not img]
        if with_img:
            result["img_accuracy"] = mean_percent(with_img)
        if without:
            result["no_img_accuracy"] = mean_percent(without)
    return result
