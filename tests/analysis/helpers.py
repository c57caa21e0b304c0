"""Small data and checks shared by the analysis tests."""

import numpy as np
import torch
from PIL import Image

VOCAB = 97
IMAGE_TOKEN = 96  # tiny_llava's image token; 4 per 28 px image


def two_task_batches(conflict: bool, seed: int = 0, n_batches: int = 2, batch_size: int = 2, seq: int = 6,
                     labelled: int = 2, image: bool = False) -> dict[str, list[dict]]:
    """Two tasks on identical inputs: the same targets (agree) or different ones (conflict).

    Only the last ``labelled`` positions carry labels; with ``image`` each sample starts with one
    image (4 image tokens) and the batch has ``pixel_values``.
    """
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for _ in range(n_batches):
        ids = torch.randint(1, IMAGE_TOKEN, (batch_size, seq), generator=g)
        if image:
            ids[:, :4] = IMAGE_TOKEN
        targets = torch.full((batch_size, seq), -100)
        targets[:, -labelled:] = torch.randint(1, IMAGE_TOKEN, (batch_size, labelled), generator=g)
        other = targets.clone()
        if conflict:
            other[:, -labelled:] = (targets[:, -labelled:] + 40) % (IMAGE_TOKEN - 1) + 1  # always a different token
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": targets}
        if image:
            batch["pixel_values"] = torch.randn(batch_size, 3, 28, 28, generator=g)
        first.append(batch)
        second.append({k: v.clone() for k, v in batch.items()} | {"labels": other})
    return {"first": first, "second": second}


def randomize_adapter(model, seed: int = 0, scale: float = 0.3) -> None:
    """Random values in every adapter tensor and router (B is zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("shared_a", "expert_", "factor_", "router", "lora_")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def assert_picture(path) -> None:
    """The file is a readable, non-empty image of more than one colour."""
    with Image.open(path) as image:
        image.load()
        assert image.width > 0 and image.height > 0
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (pixels != pixels[0]).any(), f"{path} is a single colour"
