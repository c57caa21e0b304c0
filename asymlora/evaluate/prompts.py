"""Answer prompts appended to each benchmark question.

The first group are the response-format prompts LLaVA-1.5 uses in its
evaluation question files (``llava_*.jsonl``; LLaVA-1.5 paper, Table 7),
which the AsymLoRA/MixLoRA comparisons reuse. The prompt follows the
question after a newline. ``classification`` and ``snli_ve`` have no
LLaVA-1.5 prompt; the ones below are this library's choice (short,
closed-vocabulary, in the same style). MM-Vet is open-ended: no prompt.
"""

from __future__ import annotations

SHORT_ANSWER = "Answer the question using a single word or phrase."

ANSWER_PROMPTS: dict[str, str] = {
    "vqav2": SHORT_ANSWER,
    "gqa": SHORT_ANSWER,
    "textvqa": SHORT_ANSWER,
    "vizwiz": ("When the provided information is insufficient, respond with "
               "'Unanswerable'.\n" + SHORT_ANSWER),
    "pope": SHORT_ANSWER,
    "mme": SHORT_ANSWER,
    "scienceqa": "Answer with the option's letter from the given choices directly.",
    "mmvet": "",
    # Not from LLaVA-1.5 (it has no such benchmark): our choice, same style.
    "classification": "What is the main object in the image? " + SHORT_ANSWER,
    "snli_ve": ("Does the image semantically entail the hypothesis? Answer with "
                "one word: entailment, neutral or contradiction."),
}


def build_prompt(benchmark: str, question: str) -> str:
    """``question`` followed by the benchmark's answer prompt on a new line."""
    if benchmark not in ANSWER_PROMPTS:
        raise KeyError(f"no answer prompt for benchmark {benchmark!r}; "
                       f"known: {', '.join(sorted(ANSWER_PROMPTS))}")
    suffix = ANSWER_PROMPTS[benchmark]
    return f"{question}\n{suffix}" if suffix else question
