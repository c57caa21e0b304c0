"""Model-agnostic prediction runner, scoring and comparison tables.

* :func:`run_predictions` calls a ``generate_batch`` function on batches of
  samples and appends one JSON line per prediction, flushing after each
  batch; started again on the same file it resumes where it stopped.
* :func:`score` dispatches a benchmark's predictions to its metric and can
  write the metrics as JSON plus a markdown table.
* :func:`render_comparison_table` builds the papers' comparison table
  (methods as rows, benchmarks as columns) from several metrics files.

Nothing here prints: progress goes through the ``on_progress`` callback and
tables are returned as strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from asymlora.evaluate.metrics import (
    JudgedItem, classification_scores, gqa_scores, mme_scores, mmvet_score,
    multiple_choice_scores, pope_scores, snli_ve_scores, vizwiz_scores, vqa_scores)
from asymlora.evaluate.metrics.judge import Judge
from asymlora.evaluate.samples import DatasetFormatError, EvalSample

GenerateBatch = Callable[[list[EvalSample]], list[str]]
ProgressCallback = Callable[[int, int], None]

#: benchmark name -> metric family.
BENCHMARK_FAMILIES: dict[str, str] = {
    "vqav2": "vqa", "textvqa": "vqa", "vizwiz": "vizwiz", "gqa": "gqa",
    "mme": "mme", "pope": "pope", "scienceqa": "multiple_choice",
    "classification": "classification", "cifar10": "classification",
    "cifar100": "classification", "mnist": "classification",
    "snli_ve": "snli_ve", "mmvet": "judge",
}

#: Default comparison-table columns: (benchmark, metric key, header).
DEFAULT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("vqav2", "accuracy", "VQAv2"), ("gqa", "accuracy", "GQA"),
    ("vizwiz", "average", "VizWiz"), ("textvqa", "accuracy", "TextVQA"),
    ("scienceqa", "img_accuracy", "SQA-IMG"), ("pope", "f1", "POPE"),
    ("mme", "perception", "MME-P"), ("mme", "cognition", "MME-C"),
    ("mmvet", "total", "MM-Vet"), ("cifar10", "accuracy", "CIFAR-10"),
    ("cifar100", "accuracy", "CIFAR-100"), ("mnist", "accuracy", "MNIST"),
    ("classification", "accuracy", "Classification"),
    ("snli_ve", "accuracy", "SNLI-VE"),
)

#: The VizWiz detail columns of the AsymLoRA tables (pass as ``columns``).
VIZWIZ_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("vizwiz", "yes/no", "Yes/No"), ("vizwiz", "number", "Number"),
    ("vizwiz", "other", "Other"), ("vizwiz", "unanswerable", "Unans."),
    ("vizwiz", "average", "Avg."),
)


# ------------------------------------------------------------------ predictions
def _parse_prediction_line(raw: bytes) -> dict:
    obj = json.loads(raw)
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) \
            or not isinstance(obj.get("prediction"), str):
        raise ValueError('expected {"id": str, "prediction": str}')
    return obj


def _load_existing(path: Path) -> dict[str, str]:
    """Read a predictions file, cutting off a truncated / corrupt last line.

    A bad line that is not the last one raises DatasetFormatError (file, line).
    """
    data = path.read_bytes()
    done: dict[str, str] = {}
    pos, lineno = 0, 0
    while pos < len(data):
        newline = data.find(b"\n", pos)
        end = len(data) if newline == -1 else newline + 1
        raw = data[pos:end]
        lineno += 1
        if raw.strip():
            try:
                obj = _parse_prediction_line(raw)
            except ValueError as exc:  # includes JSON and UTF-8 decoding errors
                if not data[end:].strip():  # the last line: a write cut short
                    with path.open("r+b") as f:
                        f.truncate(pos)
                    return done
                raise DatasetFormatError(path, f"bad prediction line ({exc})",
                                         line=lineno) from None
            done[obj["id"]] = obj["prediction"]
        pos = end
    if data and not data.endswith(b"\n"):
        # The last record is complete but lacks its newline: add it before appending.
        with path.open("ab") as f:
            f.write(b"\n")
    return done


def read_predictions(path: str | Path) -> dict[str, str]:
    """``{id: prediction}`` from a predictions JSONL written by :func:`run_predictions`.

    A truncated last line (a run killed mid-write) is ignored *and removed*
    from the file so that appending continues on a clean line.
    """
    path = Path(path)
    return _load_existing(path) if path.exists() else {}


def run_predictions(samples: Sequence[EvalSample], generate_batch: GenerateBatch,
                    predictions_path: str | Path, batch_size: int = 8,
                    on_progress: ProgressCallback | None = None) -> dict[str, str]:
    """Generate a prediction for every sample, resuming from ``predictions_path``.

    Each line written is ``{"id", "benchmark", "prediction"}``; the file is
    flushed (and fsynced) after every batch. Samples whose id already has a
    prediction in the file are skipped. ``on_progress(done, total)`` is
    called once after loading the file and after every batch.

    Returns ``{id: prediction}`` for all ``samples`` (in sample order).

    Raises:
        ValueError: duplicate sample ids, ``batch_size < 1``, or
            ``generate_batch`` returning the wrong number of strings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise ValueError(f"duplicate sample id {dup!r}: ids must be unique")
    path = Path(predictions_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_predictions(path)
    wanted = set(ids)
    done = {k: v for k, v in existing.items() if k in wanted}
    pending = [s for s in samples if s.id not in done]
    total = len(samples)
    if on_progress is not None:
        on_progress(len(done), total)
    with path.open("a", encoding="utf-8") as f:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            outputs = generate_batch(list(batch))
            if not isinstance(outputs, list) or len(outputs) != len(batch) \
                    or not all(isinstance(o, str) for o in outputs):
                got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
                raise ValueError(f"generate_batch must return a list of {len(batch)} "
                                 f"strings for a batch of {len(batch)} samples, got {got}")
            for sample, text in zip(batch, outputs):
                f.write(json.dumps({"id": sample.id, "benchmark": sample.benchmark,
                                    "prediction": text}, ensure_ascii=False) + "\n")
                done[sample.id] = text
            f.flush()
            os.fsync(f.fileno())
            if on_progress is not None:
                on_progress(len(done), total)
    return {i: done[i] for i in ids}


# ---------------------------------------------------------------------- scoring
def _single(sample: EvalSample) -> str:
    if len(sample.answers) != 1:
        raise ValueError(f"sample {sample.id!r} ({sample.benchmark}) needs exactly one "
                         f"reference answer, has {len(sample.answers)}")
    return sample.answers[0]


def score(benchmark_name: str, samples: Sequence[EvalSample],
          predictions: Mapping[str, str], metrics_path: str | Path | None = None,
          judge: Judge | None = None) -> dict[str, float]:
    """Score ``predictions`` (``{id: text}``) of ``samples`` with the benchmark's metric.

    With ``metrics_path`` the result is merged into that JSON file
    (``{"benchmarks": {name: metrics}}``, so one file can hold several
    benchmarks of a run) and a markdown table of all its benchmarks is
    written next to it (same name, ``.md``).

    Raises:
        KeyError: unknown benchmark.
        ValueError: a sample has no prediction, or no reference answers
            (e.g. VQAv2 test-dev, which only the evaluation server can score).
        MissingJudgeError: MM-Vet without a ``judge``.
    """
    if benchmark_name not in BENCHMARK_FAMILIES:
        raise KeyError(f"unknown benchmark {benchmark_name!r}; known: "
                       f"{', '.join(sorted(BENCHMARK_FAMILIES))}")
    family = BENCHMARK_FAMILIES[benchmark_name]
    if not samples:
        raise ValueError(f"{benchmark_name}: no samples to score")
    missing = [s.id for s in samples if s.id not in predictions]
    if missing:
        raise ValueError(f"{benchmark_name}: {len(missing)} of {len(samples)} samples have "
                         f"no prediction (first: {missing[:5]})")
    unanswered = [s.id for s in samples if not s.answers]
    if unanswered:
        raise ValueError(f"{benchmark_name}: {len(unanswered)} samples have no reference "
                         f"answers (first: {unanswered[:5]}); a test split without public "
                         "answers can only be scored by the benchmark's server")
    preds = [predictions[s.id] for s in samples]
    if family == "vqa":
        result = vqa_scores(preds, [s.answers for s in samples],
                            [s.answer_type for s in samples])
    elif family == "vizwiz":
        result = vizwiz_scores(preds, [s.answers for s in samples],
                               [s.answer_type or "" for s in samples])
    elif family == "gqa":
        result = gqa_scores(preds, [_single(s) for s in samples],
                            [s.answer_type for s in samples])
    elif family == "mme":
        result = mme_scores(preds, [_single(s) for s in samples],
                            [s.subtask or "" for s in samples],
                            [str(s.meta.get("image_name", s.image)) for s in samples])
    elif family == "pope":
        result = pope_scores(preds, [_single(s) for s in samples],
                             [s.subtask for s in samples])
    elif family == "multiple_choice":
        result = multiple_choice_scores(
            preds, [_single(s) for s in samples], [len(s.choices) for s in samples],
            [bool(s.meta.get("has_image", s.image is not None)) for s in samples])
    elif family == "classification":
        label_set = samples[0].meta.get("label_set")
        result = classification_scores(preds, [_single(s) for s in samples], label_set)
    elif family == "snli_ve":
        result = snli_ve_scores(preds, [_single(s) for s in samples])
    else:  # judge
        items = [JudgedItem(id=s.id, question=s.question, gold=_single(s), prediction=p,
                            capabilities=list(s.meta.get("capabilities", [])))
                 for s, p in zip(samples, preds)]
        result = mmvet_score(items, judge)
    result = {k: float(v) for k, v in result.items()}
    if metrics_path is not None:
        _write_metrics(Path(metrics_path), benchmark_name, result)
    return result


def _read_metrics_file(path: Path) -> dict[str, dict[str, float]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from None
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else None
    if not isinstance(benchmarks, dict):
        raise DatasetFormatError(path, "expected {\"benchmarks\": {name: {metric: value}}}",
                                 field_name="benchmarks")
    return benchmarks


def _write_metrics(path: Path, benchmark: str, metrics: dict[str, float]) -> None:
    benchmarks = _read_metrics_file(path) if path.exists() else {}
    benchmarks[benchmark] = metrics
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"benchmarks": benchmarks}, indent=2, sort_keys=True) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    path.with_suffix(".md").write_text(metrics_markdown(benchmarks), encoding="utf-8")


def metrics_markdown(benchmarks: Mapping[str, Mapping[str, float]], precision: int = 2) -> str:
    """One markdown table per benchmark: ``| metric | value |`` rows."""
    parts = []
    for name in sorted(benchmarks):
        rows = [f"### {name}", "", "| metric | value |", "|---|---:|"]
        rows += [f"| {key} | {value:.{precision}f} |"
                 for key, value in benchmarks[name].items()]
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


def render_comparison_table(runs: Mapping[str, str | Path],
                            columns: Sequence[tuple[str, str, str]] | None = None,
                            precision: int = 1, bold_best: bool = False) -> str:
    """The papers' comparison table: one row per method, one column per metric.

    ``runs`` maps a method name (row label, in the given order) to the
    metrics JSON written by :func:`score`. ``columns`` are
    ``(benchmark, metric key, header)``; by default :data:`DEFAULT_COLUMNS`,
    keeping only those that at least one run has. Missing cells show ``-``.
    With ``bold_best`` the highest value of each column is bold.
    """
    if not runs:
        raise ValueError("render_comparison_table needs at least one run")
    loaded = {method: _read_metrics_file(Path(p)) for method, p in runs.items()}

    def cell(method: str, bench: str, key: str) -> float | None:
        return loaded[method].get(bench, {}).get(key)

    cols = list(columns) if columns is not None else [
        c for c in DEFAULT_COLUMNS
        if any(cell(m, c[0], c[1]) is not None for m in loaded)]
    if not cols:
        raise ValueError("no known benchmark metric in the given runs; pass columns=")
    best = {}
    for bench, key, _ in cols:
        values = [v for m in loaded if (v := cell(m, bench, key)) is not None]
        best[(bench, key)] = max(values) if values else None
    lines = ["| Method | " + " | ".join(h for _, _, h in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for method in loaded:
        cells = []
        for bench, key, _ in cols:
            value = cell(method, bench, key)
            if value is None:
                cells.append("-")
                continue
            text = f"{value:.{precision}f}"
            if bold_best and value == best[(bench, key)] and len(loaded) > 1:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
