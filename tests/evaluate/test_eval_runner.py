"""Resumable prediction runner, scoring dispatch and the comparison table."""

import json
from pathlib import Path

import pytest

from asymlora.evaluate.loaders import load_mme, load_pope, load_scienceqa
from asymlora.evaluate.metrics.judge import MissingJudgeError
from asymlora.evaluate.runner import (
    read_predictions, render_comparison_table, run_predictions, score)
from asymlora.evaluate.samples import DatasetFormatError, EvalSample

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "evaluate"


def _samples(n):
    return [EvalSample(id=f"q{i}", benchmark="gqa", question=f"Q{i}?", prompt=f"Q{i}?",
                       answers=["yes"]) for i in range(n)]


def test_run_writes_jsonl_and_reports_progress(tmp_path):
    path = tmp_path / "preds.jsonl"
    progress, batches = [], []

    def generate(batch):
        batches.append([s.id for s in batch])
        return [s.id.upper() for s in batch]

    out = run_predictions(_samples(5), generate, path, batch_size=2,
                          on_progress=lambda d, t: progress.append((d, t)))
    assert batches == [["q0", "q1"], ["q2", "q3"], ["q4"]]
    assert progress == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert out == {f"q{i}": f"Q{i}" for i in range(5)}
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"id": "q0", "benchmark": "gqa", "prediction": "Q0"}


def test_resume_skips_done_and_drops_truncated_last_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": "q0", "prediction": "yes"}\n'
                    '{"id": "q1", "prediction": "no"}\n'
                    '{"id": "q2", "predic')             # killed mid-write
    seen = []

    def generate(batch):
        seen.extend(s.id for s in batch)
        return ["maybe"] * len(batch)

    out = run_predictions(_samples(4), generate, path, batch_size=8)
    assert seen == ["q2", "q3"]
    assert out == {"q0": "yes", "q1": "no", "q2": "maybe", "q3": "maybe"}
    # the file is valid JSONL again, one line per sample
    assert read_predictions(path) == out
    assert len(path.read_text().splitlines()) == 4


def test_resume_after_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": "q0", "prediction": "yes"}')
    run_predictions(_samples(2), lambda b: ["no"] * len(b), path)
    assert read_predictions(path) == {"q0": "yes", "q1": "no"}


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": "q0", "prediction": "yes"}\nGARBAGE\n'
                    '{"id": "q1", "prediction": "no"}\n')
    with pytest.raises(DatasetFormatError, match=r"preds\.jsonl, line 2"):
        read_predictions(path)


def test_generate_batch_contract_and_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="list of 2 strings"):
        run_predictions(_samples(2), lambda b: ["only one"], tmp_path / "p.jsonl")
    dup = _samples(2) + _samples(1)
    with pytest.raises(ValueError, match="duplicate sample id 'q0'"):
        run_predictions(dup, lambda b: ["x"] * len(b), tmp_path / "p2.jsonl")


def test_score_pope_writes_json_and_markdown(tmp_path):
    samples = load_pope(FIX / "pope")
    # adversarial: yes/no right; random: answers "No" to a "yes" -> FN.
    preds = {"adversarial/1": "Yes", "adversarial/2": "No",
             "random/1": "No", "random/2": "No"}
    metrics_path = tmp_path / "run" / "metrics.json"
    out = score("pope", samples, preds, metrics_path=metrics_path)
    assert out["adversarial/accuracy"] == 100.0 and out["random/accuracy"] == 50.0
    assert out["accuracy"] == pytest.approx(75.0)
    assert out["f1"] == pytest.approx(50.0)      # (100 + 0) / 2
    saved = json.loads(metrics_path.read_text())
    assert saved["benchmarks"]["pope"]["f1"] == pytest.approx(50.0)
    md = metrics_path.with_suffix(".md").read_text()
    assert "### pope" in md and "| f1 | 50.00 |" in md


def test_score_mme_scienceqa_and_merging(tmp_path):
    metrics_path = tmp_path / "metrics.json"
    mme = load_mme(FIX / "mme/flat")
    preds = {s.id: s.answers[0] for s in mme}            # all correct
    out = score("mme", mme, preds, metrics_path=metrics_path)
    assert out["perception"] == 200.0 and out["cognition"] == 200.0
    sqa = load_scienceqa(FIX / "scienceqa/problems.json", FIX / "scienceqa/pid_splits.json")
    out = score("scienceqa", sqa, {"5": "A", "12": "A"}, metrics_path=metrics_path)
    assert out["accuracy"] == 50.0 and out["img_accuracy"] == 100.0
    saved = json.loads(metrics_path.read_text())["benchmarks"]
    assert set(saved) == {"mme", "scienceqa"}


def test_score_errors():
    samples = _samples(2)
    with pytest.raises(ValueError, match="1 of 2 samples have no prediction"):
        score("gqa", samples, {"q0": "yes"})
    with pytest.raises(KeyError, match="unknown benchmark"):
        score("vqa-v9", samples, {})
    unanswered = [EvalSample(id="1", benchmark="vqav2", question="q", prompt="q")]
    with pytest.raises(ValueError, match="no reference answers"):
        score("vqav2", unanswered, {"1": "yes"})
    mmvet = [EvalSample(id="v1_0", benchmark="mmvet", question="q", prompt="q",
                        answers=["a"])]
    with pytest.raises(MissingJudgeError):
        score("mmvet", mmvet, {"v1_0": "a"})


def test_render_comparison_table(tmp_path):
    runs = {}
    for method, (gqa, f1) in {"LoRA": (60.0, 85.25), "AsymLoRA": (62.5, 86.0)}.items():
        p = tmp_path / f"{method}.json"
        p.write_text(json.dumps({"benchmarks": {"gqa": {"accuracy": gqa},
                                                "pope": {"f1": f1}}}))
        runs[method] = p
    p = tmp_path / "MixLoRA.json"
    p.write_text(json.dumps({"benchmarks": {"gqa": {"accuracy": 61.0}}}))
    runs["MixLoRA"] = p
    table = render_comparison_table(runs)
    assert table.splitlines() == [
        "| Method | GQA | POPE |",
        "|---|---:|---:|",
        "| LoRA | 60.0 | 85.2 |",
        "| AsymLoRA | 62.5 | 86.0 |",
        "| MixLoRA | 61.0 | - |",
    ]
    bold = render_comparison_table(runs, bold_best=True)
    assert "| AsymLoRA | **62.5** | **86.0** |" in bold


def test_render_comparison_table_bad_file(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('{"gqa": 1}')
    with pytest.raises(DatasetFormatError, match=r"m\.json, field 'benchmarks'"):
        render_comparison_table({"x": bad})
