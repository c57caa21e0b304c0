"""The CLI verbs after `train`: eval (suite and a public format, resumable), table, interference, routing."""

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from asymlora.cli import main
from asymlora.data.suite import generate_suite, mixture_config

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["count_digit", "count_word"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A soft-routed AsymLoRA on two suite tasks, trained 3 steps through the CLI."""
    tmp = tmp_path_factory.mktemp("cli")
    suite = tmp / "suite"
    generate_suite(suite, seed=0, n_train=8, n_val=2, n_test=4, tasks=TASKS, image_size=32)
    config = {
        "model": {"name_or_path": "tiny-llava"},
        "adapter": {"method": "asymlora", "r": 4, "lora_alpha": 8, "num_experts": 2, "routing": "soft"},
        "data": {"datasets": mixture_config(suite, TASKS), "max_length": 128, "val_fraction": 0.25},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 3, "batch_size": 4, "logging_steps": 1,
                  "tensorboard": False},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    return tmp, suite, path


def test_eval_suite_writes_predictions_metrics_and_resumes(trained, capsys):
    tmp, suite, _ = trained
    out = tmp / "eval"
    args = ["eval", "--adapter", str(tmp / "run" / "adapter"), "--benchmark", "suite", "--data", str(suite),
            "--out", str(out), "--max-new-tokens", "3", "--batch-size", "3"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())["benchmarks"]
    assert set(metrics) == set(TASKS) and all("accuracy" in m for m in metrics.values())
    predictions = (out / "suite.count_digit.predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4
    # a run stopped half-way: cut the file back to one prediction, then resume
    (out / "suite.count_digit.predictions.jsonl").write_text(predictions[0] + "\n" + predictions[1][:10])
    assert main(args) == 0
    resumed = (out / "suite.count_digit.predictions.jsonl").read_text().splitlines()
    assert len(resumed) == 4 and resumed[0] == predictions[0]
    assert "| count_digit" in capsys.readouterr().out or (out / "metrics.md").is_file()


def test_eval_public_format_and_table(trained, capsys):
    tmp, _, _ = trained
    out = tmp / "eval_pope"
    assert main(["eval", "--adapter", str(tmp / "run" / "adapter"), "--benchmark", "pope",
                 "--data", str(ROOT / "tests/fixtures/evaluate/pope"), "--route", "learned", "--out", str(out),
                 "--max-new-tokens", "2"]) == 0
    pope = json.loads((out / "metrics.json").read_text())["benchmarks"]["pope"]
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(pope)
    capsys.readouterr()
    assert main(["table", f"AsymLoRA={out / 'metrics.json'}", f"Again={out / 'metrics.json'}"]) == 0
    table = capsys.readouterr().out
    assert "| AsymLoRA |" in table and "| Again |" in table


def test_eval_refuses_conflicting_routing_flags(trained, capsys):
    tmp, suite, _ = trained
    assert main(["eval", "--adapter", str(tmp / "run" / "adapter"), "--benchmark", "suite", "--data", str(suite),
                 "--task", "count_digit", "--route", "learned"]) == 2
    assert "exclusive" in capsys.readouterr().err


def test_interference_and_routing_commands(trained):
    tmp, _, config = trained
    out = tmp / "analysis"
    assert main(["interference", str(config), "--out", str(out / "i"), "--batches", "1", "--batch-size", "2"]) == 0
    result = json.loads((out / "i" / "interference.json").read_text())
    assert result["tasks"] == TASKS
    assert Image.open(out / "i" / "interference.png").size[0] > 100
    assert main(["routing", str(config), "--out", str(out / "r"), "--batches", "2", "--batch-size", "2"]) == 0
    assert (out / "r" / "routing.json").is_file() and (out / "r" / "routing_tsne.png").is_file()
