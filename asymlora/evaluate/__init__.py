"""Evaluation layer: benchmark loaders, official-definition metrics, a
resumable prediction runner and comparison tables (model-agnostic)."""

from asymlora.evaluate.loaders import (
    load_benchmark, load_classification, load_gqa, load_mme, load_mmvet, load_pope, load_scienceqa,
    load_snli_ve, load_textvqa, load_vizwiz, load_vqav2)
from asymlora.evaluate.prompts import ANSWER_PROMPTS, build_prompt
from asymlora.evaluate.runner import (
    BENCHMARK_FAMILIES, read_predictions, render_comparison_table, run_predictions, score)
from asymlora.evaluate.samples import DatasetFormatError, EvalSample

__all__ = [
    "ANSWER_PROMPTS", "BENCHMARK_FAMILIES", "DatasetFormatError", "EvalSample",
    "build_prompt", "load_benchmark", "load_classification", "load_gqa", "load_mme", "load_mmvet",
    "load_pope", "load_scienceqa", "load_snli_ve", "load_textvqa", "load_vizwiz",
    "load_vqav2", "read_predictions", "render_comparison_table", "run_predictions", "score",
]
