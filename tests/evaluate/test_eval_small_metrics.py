"""VizWiz, GQA, multiple-choice, classification and SNLI-VE metrics, with
expected numbers derived by hand from each scorer's definition."""

import pytest

from asymlora.evaluate.metrics.classification import (
    classification_scores, label_matches, normalize_label)
from asymlora.evaluate.metrics.gqa import gqa_scores, normalize_gqa
from asymlora.evaluate.metrics.multiple_choice import (
    extract_choice_letter, multiple_choice_scores)
from asymlora.evaluate.metrics.snli_ve import parse_snli_ve_label, snli_ve_scores
from asymlora.evaluate.metrics.vizwiz import vizwiz_scores


# ---------------------------------------------------------------- VizWiz
def test_vizwiz_per_type_and_plain_average():
    preds = ["yes", "no", "3", "red", "Unanswerable"]
    refs = [["yes"] * 10,                   # yes/no: 1.0
            ["yes"] * 10,                   # yes/no: 0.0
            ["3", "3"] + ["4"] * 8,          # number: 2 of 10 -> 0.6
            ["red"] * 10,                   # other: 1.0
            ["unanswerable"] * 10]          # unanswerable (after lowercasing): 1.0
    types = ["yes/no", "yes/no", "number", "other", "unanswerable"]
    out = vizwiz_scores(preds, refs, types)
    assert out["yes/no"] == pytest.approx(50.0)          # (1 + 0) / 2
    assert out["number"] == pytest.approx(60.0)
    assert out["other"] == pytest.approx(100.0)
    assert out["unanswerable"] == pytest.approx(100.0)
    # plain average of the four type accuracies: (50 + 60 + 100 + 100) / 4 = 77.5
    assert out["average"] == pytest.approx(77.5)
    # overall, weighted by question: (1 + 0 + 0.6 + 1 + 1) / 5 = 0.72
    assert out["accuracy"] == pytest.approx(72.0)


def test_vizwiz_rejects_unknown_type():
    with pytest.raises(ValueError, match="answer_type 'colour'"):
        vizwiz_scores(["x"], [["x"] * 10], ["colour"])


# ------------------------------------------------------------------- GQA
def test_gqa_normalisation_and_exact_match():
    # LLaVA rule: rstrip('.') then lower; we also strip whitespace.
    assert normalize_gqa("Yes.\n") == "yes"
    assert normalize_gqa(" Racket..") == "racket"
    # exact match only: "a racket" != "racket" (no article removal in GQA).
    out = gqa_scores(["Yes.", "a racket", "left"], ["yes", "racket", "left"],
                     ["verify", "query", "query"])
    assert out["accuracy"] == pytest.approx(200 / 3)    # 2 of 3
    assert out["verify"] == pytest.approx(100.0)
    assert out["query"] == pytest.approx(50.0)           # 1 of 2


# -------------------------------------------------------- multiple choice
@pytest.mark.parametrize("response, n, expected", [
    ("B", 4, "B"),                            # rule 1: bare letter
    (" C \n", 4, "C"),                        # stripped first
    ("A. West Virginia", 4, "A"),             # rule 2: letter + ". "
    ("The answer is D.", 4, "D"),             # rule 3: exactly one "The answer is X."
    ("The answer is A. The answer is B.", 4, None),   # two matches -> failed
    ("E", 4, None),                           # letter beyond the 4 choices
    ("B.", 4, None),                          # bare "B." fails, as in LLaVA's script
    ("West Virginia", 4, None),               # option text, not a letter
])
def test_extract_choice_letter(response, n, expected):
    assert extract_choice_letter(response, n) == expected


def test_multiple_choice_scores_with_image_split():
    preds = ["A", "The answer is B.", "C", "nonsense"]
    golds = ["A", "B", "A", "B"]
    has_image = [True, True, False, False]
    out = multiple_choice_scores(preds, golds, [4, 2, 3, 2], has_image)
    assert out["accuracy"] == pytest.approx(50.0)        # 2 of 4 correct
    assert out["img_accuracy"] == pytest.approx(100.0)   # both image questions right
    assert out["no_img_accuracy"] == pytest.approx(0.0)


# ---------------------------------------------------------- classification
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
           "ship", "truck"]


def test_classification_label_rule():
    assert normalize_label("Aquarium_Fish!") == "aquarium fish"
    assert normalize_label("Seven") == "7"               # MNIST digit words
    assert label_matches("Cat.", "cat", CIFAR10)         # rule 1 (equality)
    assert label_matches("It is a cat", "cat", CIFAR10)  # rule 2 (contains, no other label)
    assert not label_matches("a cat or a dog", "cat", CIFAR10)  # another label present
    assert not label_matches("category", "cat", CIFAR10)        # whole words only
    # a label contained in the gold label is not a competitor: maple tree vs tree
    assert label_matches("a maple tree", "maple_tree", ["maple_tree", "tree"])
    assert label_matches("seven", "7")


def test_classification_scores():
    out = classification_scores(["cat", "dog", "a ship"], ["cat", "cat", "ship"], CIFAR10)
    assert out["accuracy"] == pytest.approx(200 / 3)    # 2 of 3


# ------------------------------------------------------------------ SNLI-VE
def test_snli_ve_parsing_and_scores():
    assert parse_snli_ve_label("Entailment") == "entailment"
    assert parse_snli_ve_label("The hypothesis contradicts the image.") == "contradiction"
    # earliest stem wins
    assert parse_snli_ve_label("neutral, not entailment") == "neutral"
    assert parse_snli_ve_label("yes") is None
    out = snli_ve_scores(["entailment", "neutral", "yes"],
                         ["entailment", "contradiction", "contradiction"])
    assert out["accuracy"] == pytest.approx(100 / 3)
    assert out["entailment"] == pytest.approx(100.0)
    assert out["contradiction"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="gold label 'maybe'"):
        snli_ve_scores(["x"], ["maybe"])
