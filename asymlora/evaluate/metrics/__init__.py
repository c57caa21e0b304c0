"""Benchmark metrics, one module per family, each matching the official scorer."""

from asymlora.evaluate.metrics.classification import classification_scores, label_matches
from asymlora.evaluate.metrics.gqa import gqa_scores, normalize_gqa
from asymlora.evaluate.metrics.judge import Judge, JudgedItem, MissingJudgeError, mmvet_score
from asymlora.evaluate.metrics.mme import mme_scores, parse_mme_answer
from asymlora.evaluate.metrics.multiple_choice import extract_choice_letter, multiple_choice_scores
from asymlora.evaluate.metrics.pope import parse_pope_answer, pope_scores
from asymlora.evaluate.metrics.snli_ve import parse_snli_ve_label, snli_ve_scores
from asymlora.evaluate.metrics.vizwiz import vizwiz_scores
from asymlora.evaluate.metrics.vqa import normalize_answer, vqa_accuracy, vqa_scores

__all__ = [
    "Judge", "JudgedItem", "MissingJudgeError", "classification_scores",
    "extract_choice_letter", "gqa_scores", "label_matches", "mme_scores",
    "mmvet_score", "multiple_choice_scores", "normalize_answer", "normalize_gqa",
    "parse_mme_answer", "parse_pope_answer", "parse_snli_ve_label", "pope_scores",
    "snli_ve_scores", "vizwiz_scores", "vqa_accuracy", "vqa_scores",
]
