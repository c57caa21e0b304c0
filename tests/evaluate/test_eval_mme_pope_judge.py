"""MME, POPE and the MM-Vet judge, with hand-derived numbers."""

import pytest

from asymlora.evaluate.metrics.judge import JudgedItem, MissingJudgeError, mmvet_score
from asymlora.evaluate.metrics.mme import (
    COGNITION_SUBTASKS, PERCEPTION_SUBTASKS, mme_scores, parse_mme_answer)
from asymlora.evaluate.metrics.pope import parse_pope_answer, pope_scores


# ---------------------------------------------------------------------- MME
@pytest.mark.parametrize("response, expected", [
    ("Yes", "yes"),
    ("no", "no"),
    ("Yes, there is a train.", "yes"),   # 'yes' in the first 4 chars "yes,"
    ("No.", "no"),
    ("Not really", "no"),                # 'no' in "not "
    ("none", "no"),                      # 'no' in "none"
    ("I think yes", "other"),            # first 4 chars "i th": neither
    ("Maybe", "other"),
])
def test_parse_mme_answer(response, expected):
    assert parse_mme_answer(response) == expected


def test_mme_acc_acc_plus_and_sums():
    # existence: image a (both right), image b (one right) -> acc 3/4 = 75,
    # acc+ 1/2 = 50, score 125.
    # code_reasoning: image c (both right) -> acc 100, acc+ 100, score 200.
    preds = ["Yes", "No", "Yes", "Yes", "yes", "no"]
    golds = ["Yes", "No", "Yes", "No", "Yes", "No"]
    tasks = ["existence"] * 4 + ["code_reasoning"] * 2
    images = ["a.jpg", "a.jpg", "b.jpg", "b.jpg", "c.png", "c.png"]
    out = mme_scores(preds, golds, tasks, images)
    assert out["existence/acc"] == pytest.approx(75.0)
    assert out["existence/acc_plus"] == pytest.approx(50.0)
    assert out["existence/score"] == pytest.approx(125.0)
    assert out["code_reasoning/score"] == pytest.approx(200.0)
    assert out["perception"] == pytest.approx(125.0)
    assert out["cognition"] == pytest.approx(200.0)
    assert out["perception_subtasks"] == 1.0
    assert out["cognition_subtasks"] == 1.0


def test_mme_full_marks_are_2000_and_800():
    preds, golds, tasks, images = [], [], [], []
    for task in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS:
        for ans in ("Yes", "No"):
            preds.append(ans)
            golds.append(ans)
            tasks.append(task)
            images.append("img.jpg")
    out = mme_scores(preds, golds, tasks, images)
    assert len(PERCEPTION_SUBTASKS) == 10 and len(COGNITION_SUBTASKS) == 4
    assert out["perception"] == pytest.approx(2000.0)   # 10 x (100 + 100)
    assert out["cognition"] == pytest.approx(800.0)     # 4 x (100 + 100)


def test_mme_other_answer_is_wrong_and_bad_gold_rejected():
    out = mme_scores(["Maybe", "No"], ["No", "No"], ["OCR", "OCR"], ["x", "x"])
    assert out["OCR/acc"] == pytest.approx(50.0) and out["OCR/acc_plus"] == 0.0
    with pytest.raises(ValueError, match="not yes/no"):
        mme_scores(["yes"], ["maybe"], ["OCR"], ["x"])
    with pytest.raises(ValueError, match="unknown MME subtask"):
        mme_scores(["yes"], ["yes"], ["ocr"], ["x"])


# --------------------------------------------------------------------- POPE
@pytest.mark.parametrize("response, expected", [
    ("Yes", "yes"),
    ("No", "no"),
    ("no, there is not.", "no"),
    ("Yes. There is no dog.", "yes"),   # only the first sentence counts
    ("There is not a dog", "no"),       # 'not' word
    ("NO", "yes"),                      # case-sensitive word check, as official
    ("Nothing", "yes"),                 # 'Nothing' is not the word 'No'
    ("I don't know", "yes"),            # neither word -> yes
])
def test_parse_pope_answer(response, expected):
    assert parse_pope_answer(response) == expected


def test_pope_metrics_by_hand():
    # labels: yes yes yes no no ; preds parse to: yes no yes yes no
    # TP = 2 (items 1, 3), FN = 1 (item 2), FP = 1 (item 4), TN = 1 (item 5)
    preds = ["Yes", "No", "Yes, it is.", "yes", "No."]
    labels = ["yes", "yes", "yes", "no", "no"]
    out = pope_scores(preds, labels)
    assert out["accuracy"] == pytest.approx(60.0)        # (2 + 1) / 5
    assert out["precision"] == pytest.approx(200 / 3)    # 2 / (2 + 1)
    assert out["recall"] == pytest.approx(200 / 3)       # 2 / (2 + 1)
    assert out["f1"] == pytest.approx(200 / 3)           # P == R -> F1 == P
    assert out["yes_ratio"] == pytest.approx(60.0)       # 3 yes of 5


def test_pope_categories_macro_average_and_zero_division():
    # random: perfect -> all 100 (yes-ratio 50); adversarial: always "no" ->
    # TP = 0, FP = 0: precision/recall/F1 = 0 (official would divide by zero),
    # accuracy 50, yes-ratio 0.
    preds = ["yes", "no", "no", "no"]
    labels = ["yes", "no", "yes", "no"]
    cats = ["random", "random", "adversarial", "adversarial"]
    out = pope_scores(preds, labels, cats)
    assert out["random/f1"] == pytest.approx(100.0)
    assert out["adversarial/f1"] == 0.0
    assert out["adversarial/accuracy"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(50.0)               # (100 + 0) / 2
    assert out["accuracy"] == pytest.approx(75.0)         # (100 + 50) / 2
    assert out["yes_ratio"] == pytest.approx(25.0)        # (50 + 0) / 2


# ------------------------------------------------------------------- MM-Vet
ITEMS = [JudgedItem("v1_0", "What is x?", "-1 <AND> -5", "x = -1 or -5", ["ocr", "math"]),
         JudgedItem("v1_1", "What animal?", "cat", "dog", ["rec"])]


def test_mmvet_without_judge_raises_clear_error():
    with pytest.raises(MissingJudgeError, match="judge"):
        mmvet_score(ITEMS, None)


def test_mmvet_with_judge_aggregates_per_capability():
    calls = []

    def judge(question, gold, prediction):
        calls.append((question, gold, prediction))
        return 1.0 if gold.startswith("-1") else 0.5

    out = mmvet_score(ITEMS, judge)
    assert calls[0] == ("What is x?", "-1 <AND> -5", "x = -1 or -5")
    assert out["total"] == pytest.approx(75.0)   # (1.0 + 0.5) / 2
    assert out["ocr"] == pytest.approx(100.0) and out["math"] == pytest.approx(100.0)
    assert out["rec"] == pytest.approx(50.0)


def test_mmvet_rejects_out_of_range_judge_scores():
    with pytest.raises(ValueError, match="v1_0"):
        mmvet_score(ITEMS, lambda q, g, p: 7)
