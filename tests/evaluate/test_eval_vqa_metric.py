"""VQA accuracy and normalisation, cases worked out by hand from the official
definition (GT-Vision-Lab/VQA vqaEval.py)."""

import pytest

from asymlora.evaluate.metrics.vqa import normalize_answer, vqa_accuracy, vqa_scores


@pytest.mark.parametrize("raw, expected", [
    # '.' not followed by a digit is deleted; then the article 'a' is dropped.
    ("a dog.", "dog"),
    # number word -> digit via the manual map.
    ("two", "2"),
    # 'none' is in the manual map too -> '0'.
    ("none", "0"),
    # contraction map restores the apostrophe.
    ("dont", "don't"),
    # lowercase, and '!' is not adjacent to a space and there is no digit,digit
    # group -> replaced by a space, which the final split/join removes.
    ("Hello World!", "hello world"),
    # digit,digit group present -> every punctuation mark is deleted: 1,000 -> 1000.
    ("1,000", "1000"),
    # no digit,digit group and ',' touches no space -> replaced by a space.
    ("red,blue", "red blue"),
    # ', ' occurs -> the comma is deleted (the space already separates words).
    ("red, blue", "red blue"),
    # a period followed by a digit is kept.
    ("3.5", "3.5"),
    # '(' and ')' touch no space -> both become spaces: "the cat s" -> drop 'the'.
    ("the cat(s)", "cat s"),
    # both periods are followed by a letter / the end -> deleted.
    ("a.m.", "am"),
    # newline/tab -> space, strip, and several articles dropped.
    ("\tThe  An\napple ", "apple"),
    # apostrophes and colons are not in the punctuation list: kept.
    ("10:30", "10:30"),
    ("man's", "man's"),
    # '-' with a space next to it ("- ") is deleted, not replaced.
    ("t- shirt", "t shirt"),
    # '-' touching no space -> replaced with a space.
    ("t-shirt", "t shirt"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_two_of_ten_is_point_six():
    # 2 annotators say "dog". Leaving out one of those 2 leaves 1 match -> 1/3;
    # leaving out one of the 8 others leaves 2 matches -> 2/3.
    # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6 (not 2/3).
    answers = ["dog", "dog"] + ["cat"] * 8
    assert vqa_accuracy("dog", answers) == pytest.approx(0.6)


def test_three_of_ten_is_point_nine():
    # 3 matches: leaving out a matching one -> 2/3 (3 subsets); others -> 3/3 = 1 (7).
    # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9.
    answers = ["dog"] * 3 + ["cat"] * 7
    assert vqa_accuracy("dog", answers) == pytest.approx(0.9)


def test_four_or_more_of_ten_is_one():
    # 4 matches: every 9-answer subset still has >= 3 matches -> 1.
    assert vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)


def test_one_of_ten_and_none():
    # 1 match: leaving it out -> 0 (1 subset); others -> 1/3 (9). 9 * 1/3 / 10 = 0.3.
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("bird", ["dog"] + ["cat"] * 9) == 0.0


def test_normalisation_applies_before_matching():
    # "Two." -> "2"; references "2" x2 and "two" x1 all normalise to "2" -> 3 matches -> 0.9.
    answers = ["2", "2", "two"] + ["3"] * 7
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)


def test_single_reference_falls_back_to_exact_match():
    assert vqa_accuracy("A dog", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0


def test_vqa_scores_percent_and_answer_types():
    preds = ["dog", "2", "no"]
    refs = [["dog", "dog"] + ["cat"] * 8,   # 0.6 (see above)
            ["2"] * 10,                       # 1.0
            ["yes"] * 10]                     # 0.0
    types = ["other", "number", "yes/no"]
    out = vqa_scores(preds, refs, types)
    # overall = (0.6 + 1 + 0) / 3 * 100 = 53.333...
    assert out["accuracy"] == pytest.approx(160 / 3)
    assert out["other"] == pytest.approx(60.0)
    assert out["number"] == pytest.approx(100.0)
    assert out["yes/no"] == pytest.approx(0.0)


def test_vqa_scores_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="length mismatch"):
        vqa_scores(["a"], [])
    with pytest.raises(ValueError, match="nothing to score"):
        vqa_scores([], [])
