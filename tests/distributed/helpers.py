"""Data for the distributed tests: three tasks (two with images, one text-only) whose every answer
is one token plus the end of turn, so every sample has the same number of label tokens."""

from pathlib import Path

import yaml
from PIL import Image

from tests.conftest import COLORS, write_tasks

TASKS = ["color", "yesno", "text"]  # task ids in data order
TEXT_WORDS = ["cat", "dog", "left", "right", "one", "two"]


def write_data(folder: Path) -> dict:
    """Three tasks: two with images, one text-only; every answer is one token (+ end of turn)."""
    images = folder / "images"
    images.mkdir(parents=True)
    rows = {"color": [], "yesno": [], "text": []}
    for i in range(6):
        name = list(COLORS)[i % 3]
        Image.new("RGB", (56, 56), COLORS[name]).save(images / f"{i}.png")
        rows["color"].append({"id": f"color{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": name}]})
        rows["yesno"].append({"id": f"yesno{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nIs the image red?"}, {"from": "gpt", "value": "yes" if i % 3 == 0 else "no"}]})
        rows["text"].append({"id": f"text{i}", "conversations": [
            {"from": "human", "value": f"Say {TEXT_WORDS[i]}."}, {"from": "gpt", "value": TEXT_WORDS[i]}]})
    return write_tasks(folder, rows, images)


def write_config(folder: Path, **train) -> Path:
    """A task-routed AsymLoRA run with one expert per task, 2 samples per process and step."""
    config = {
        "model": {"name_or_path": "tiny-llava"},
        "adapter": {"method": "asymlora", "r": 4, "lora_alpha": 8, "num_experts": 3, "routing": "task"},
        "data": write_data(folder / "data"),
        "train": {"output_dir": str(folder / "run"), "max_steps": 3, "batch_size": 2, "learning_rate": 1e-3,
                  "warmup_steps": 0, "logging_steps": 1, "save_steps": 100, "tensorboard": False, **train},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
