"""Shared fixtures: tiny random models built from configs (no hub, no downloads)."""

import json
import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_tasks(folder, rows: dict, images) -> dict:
    """One LLaVA-format JSONL file per task in ``folder`` and the ``data`` section of a run config
    naming them (equal weights, seed 0, 128 tokens)."""
    datasets = []
    for task, records in rows.items():
        path = folder / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        datasets.append({"task": task, "path": str(path), "image_folder": str(images), "weight": 1.0})
    return {"datasets": datasets, "seed": 0, "max_length": 128}


def tiny_llama(seed: int = 0, vocab: int = 97, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=28, patch_size=14)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=96,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    # 28 px images in 14 px patches: 4 image tokens per image (the CLS token is dropped).
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def llava():
    return tiny_llava()
