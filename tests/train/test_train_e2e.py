"""End to end: a JSONL mixture of two tasks with images on disk -> `asymlora train` -> adapter."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from asymlora.cli import main
from tests.conftest import COLORS, write_tasks

ROOT = Path(__file__).resolve().parents[2]


def write_mixture(folder: Path, n: int = 12) -> dict:
    images = folder / "images"
    images.mkdir(parents=True)
    rows = {"color": [], "count": []}
    for i in range(n):
        name = list(COLORS)[i % 3]
        Image.new("RGB", (56, 56), COLORS[name]).save(images / f"{i}.png")
        rows["color"].append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": name}]})
        rows["count"].append({"id": f"n{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": f"it is {name}"},
            {"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "yes"}]})
    rows["count"].append({"id": "text-only", "conversations": [
        {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
    return write_tasks(folder, rows, images)


ADAPTERS = {
    "lora": {"method": "lora", "r": 4, "lora_alpha": 8},
    "asymlora": {"method": "asymlora", "r": 4, "lora_alpha": 8, "num_experts": 2, "routing": "task"},
    "lora_moe": {"method": "lora_moe", "r": 4, "lora_alpha": 8, "num_experts": 2, "routing": "soft"},
    "mixlora": {"method": "mixlora", "r": 2, "num_factors": 4, "lora_alpha": 8},
}


def write_config(tmp: Path, adapter: dict, **train) -> Path:
    config = {
        "model": {"name_or_path": "tiny-llava"},
        "adapter": adapter,
        "data": write_mixture(tmp / "data") if not (tmp / "data").exists() else yaml.safe_load((tmp / "data.yaml").read_text()),
        "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "batch_size": 4, "learning_rate": 1e-2,
                  "logging_steps": 2, "save_steps": 2, "router_stats_steps": 2, "tensorboard": True, **train},
    }
    (tmp / "data.yaml").write_text(yaml.safe_dump(config["data"]))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_train_each_method_and_load_the_adapter(method, tmp_path, capsys):
    config = write_config(tmp_path, ADAPTERS[method])
    assert main(["train", str(config)]) == 0
    printed = capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert "loss/color" in printed.err + printed.out or "loss/color" in printed.out
    from asymlora import from_pretrained
    from asymlora.models import load_model

    base, processor = load_model("tiny-llava")
    model = from_pretrained(base, adapter)
    assert model.task_names == ["color", "count"]
    trained = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k or "expert_b" in k or "factor_b" in k)


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    # Dropout on: the RNG state must be restored exactly too.
    config = write_config(straight, {**ADAPTERS["asymlora"], "lora_dropout": 0.1}, max_steps=6)
    assert main(["train", str(config)]) == 0

    broken = tmp_path / "broken"
    broken.mkdir()
    config = write_config(broken, {**ADAPTERS["asymlora"], "lora_dropout": 0.1}, max_steps=6)
    assert main(["train", str(config), "--set", "train.stop_after_steps=3"]) == 0
    assert not (broken / "run" / "adapter").exists()
    # A newer checkpoint that is corrupt must be refused in favour of the previous one.
    corrupt = broken / "run" / "checkpoints" / "step-000004"
    import shutil

    shutil.copytree(broken / "run" / "checkpoints" / "step-000003", corrupt)
    with open(corrupt / "trainer_state.pt", "r+b") as f:
        f.truncate(100)
    assert main(["train", str(config), "--resume"]) == 0
    a = load_file(str(straight / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(broken / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_same_run(tmp_path):
    outs = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, ADAPTERS["lora_moe"], max_steps=3)
        assert main(["train", str(config)]) == 0
        outs.append(load_file(str(folder / "run" / "adapter" / "adapter_model.safetensors")))
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


def test_bad_config_is_one_clear_line(tmp_path, capsys):
    config = write_config(tmp_path, ADAPTERS["asymlora"])
    assert main(["train", str(config), "--set", "train.learning_rte=1"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rte" in err and "Traceback" not in err
    assert main(["train", str(config), "--set", "adapter.r=0"]) == 2
    assert "r must be a positive integer" in capsys.readouterr().err


def test_cli_runs_as_a_command(tmp_path):
    config = write_config(tmp_path, ADAPTERS["lora"], max_steps=1)
    done = subprocess.run([sys.executable, "-m", "asymlora.cli", "train", str(config)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "trained 1 steps" in done.stdout
