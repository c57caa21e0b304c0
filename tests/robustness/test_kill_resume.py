"""`kill -9` during training, then `--resume`: the same adapter as an uninterrupted run.

The run checkpoints every step (train.save_steps=1, two kept), so the kill lands while a
checkpoint may be half written, an old one half deleted, or anywhere in a step; the
checkpoint's temporary folder, fsync and rename (asymlora/train/checkpoint.py) must leave a
whole checkpoint to resume from in every case. Three kills (two at a step, one while a checkpoint's temporary folder exists),
then a resume to the end; dropout is on, so the restored RNG state matters too.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from asymlora.cli import main
from asymlora.train.checkpoint import list_checkpoints
from tests.distributed.helpers import write_data

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


def write_config(folder: Path) -> Path:
    config = {
        "model": {"name_or_path": "tiny-llava"},
        "adapter": {"method": "asymlora", "r": 4, "lora_alpha": 8, "num_experts": 3, "routing": "task",
                    "lora_dropout": 0.1},
        "data": write_data(folder / "data"),
        "train": {"output_dir": str(folder / "run"), "max_steps": STEPS, "batch_size": 2, "learning_rate": 1e-2,
                  "logging_steps": 10, "save_steps": 1, "save_total_limit": 2, "tensorboard": False},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def newest_step(run: Path) -> int:
    found = list_checkpoints(run)
    return int(found[-1].name.split("-")[1]) if found else 0


def writing(run: Path) -> bool:
    """A checkpoint's temporary folder exists: a write is under way."""
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())


def train_and_kill(config: Path, run: Path, until, resume: bool) -> int:
    """Start `asymlora train` in a subprocess and SIGKILL it as soon as ``until(run)`` holds;
    the newest checkpoint step at the kill."""
    command = [sys.executable, "-m", "asymlora.cli", "train", str(config)] + (["--resume"] if resume else [])
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not until(run):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the moment to kill never came"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return newest_step(run)


def test_kill_9_three_times_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert main(["train", str(write_config(straight))]) == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    config = write_config(killed)
    run = killed / "run"
    first = train_and_kill(config, run, lambda r: newest_step(r) >= 3, resume=False)
    second = train_and_kill(config, run, lambda r: newest_step(r) >= first + 5, resume=True)
    third = train_and_kill(config, run, lambda r: newest_step(r) >= second + 5 and writing(r), resume=True)
    assert 3 <= first < second < third < STEPS, (first, second, third)
    assert not (run / "adapter").exists()  # every kill landed mid-run

    assert main(["train", str(config), "--resume"]) == 0
    expected = load_file(str(straight / "run" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert [p.name for p in list_checkpoints(run)] == [f"step-{STEPS - 1:06d}", f"step-{STEPS:06d}"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp or trash left
