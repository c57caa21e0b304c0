"""The uniform sample type every benchmark loader returns, and the format error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DatasetFormatError(ValueError):
    """A benchmark file does not have the expected public layout.

    The message always names the file, and the line (JSONL / TSV) or the
    field that is wrong, so a user can open the file and fix it.
    """

    def __init__(self, path: str | Path, problem: str, line: int | None = None,
                 field_name: str | None = None) -> None:
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if field_name is not None:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")
        self.path = Path(path)
        self.line = line
        self.field_name = field_name


@dataclass
class EvalSample:
    """One evaluation item, independent of the benchmark it comes from.

    Attributes:
        id: unique id inside the benchmark (string; predictions are keyed by it).
        benchmark: canonical benchmark name, e.g. ``"vqav2"`` or ``"mme"``.
        question: the raw question / hypothesis text from the dataset.
        prompt: the full text to give the model: question (plus options for
            multiple choice) followed by the LLaVA-1.5 answer prompt.
        image: path of the image, or None when unknown (no image root given)
            or when the item has no image (text-only ScienceQA questions).
        answers: reference answers (10 annotator answers for VQA-style
            benchmarks, one gold label / letter elsewhere).
        answer_type: e.g. ``"yes/no"``, ``"number"``, ``"other"``,
            ``"unanswerable"`` (VQAv2 / VizWiz) or a GQA structural type.
        subtask: MME subtask, POPE split, MM-Vet capability set, ...
        choices: option texts for multiple choice (ScienceQA).
        meta: anything else the metric needs (e.g. MME ``image_name``).
    """

    id: str
    benchmark: str
    question: str
    prompt: str
    image: Path | None = None
    answers: list[str] = field(default_factory=list)
    answer_type: str | None = None
    subtask: str | None = None
    choices: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
