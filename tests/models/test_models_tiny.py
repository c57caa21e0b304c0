import numpy as np
import pytest
import torch
from PIL import Image

from asymlora.models.tiny import build_tiny_llama, build_tiny_llava


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(seed=0)


def _image(h=80, w=100, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


def _prompt(processor, question="What is in the image?"):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)


def test_module_names_match_llava(tiny):
    model, _ = tiny
    names = {n for n, _ in model.named_modules()}
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.language_model.layers.1.{proj}" in names
    assert "model.multi_modal_projector.linear_1" in names
    assert "model.multi_modal_projector.linear_2" in names
    assert any(n.startswith("model.vision_tower.") for n in names)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_chat_template_and_image_expansion(tiny):
    model, processor = tiny
    text = _prompt(processor)
    assert text == "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
    batch = processor(text=[text, text], images=[_image(), _image(50, 70, 1)], return_tensors="pt",
                      padding=True)
    n_img = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert n_img.tolist() == [49, 49] == [model.config.image_seq_length] * 2
    assert batch["pixel_values"].shape == (2, 3, 56, 56)


def test_forward_and_loss(tiny):
    model, processor = tiny
    batch = processor(text=[_prompt(processor) + "A cat."], images=[_image()], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_generate(tiny):
    model, processor = tiny
    batch = processor(text=[_prompt(processor)], images=[_image()], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_assistant_mask(tiny):
    _, processor = tiny
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A cat."}]
    r = processor.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
    ids = [i for i, m in zip(r["input_ids"], r["assistant_masks"]) if m]
    assert processor.tokenizer.decode(ids) == "A cat.<|im_end|>"


def test_seed_determinism_and_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, _ = build_tiny_llava(seed=1)
    assert torch.equal(torch.rand(1), expected)
    b, _ = build_tiny_llava(seed=1)
    c, _ = build_tiny_llava(seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_overrides():
    model, _ = build_tiny_llava(seed=0, hidden_size=32, num_hidden_layers=1, vision_hidden_size=16)
    assert model.config.text_config.hidden_size == 32
    assert len(model.model.language_model.layers) == 1
    assert model.config.vision_config.hidden_size == 16


def test_save_load_round_trip(tiny, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    text = _prompt(processor)
    b1 = processor(text=[text], images=[_image()], return_tensors="pt")
    b2 = processor2(text=[text], images=[_image()], return_tensors="pt")
    assert torch.equal(b1["input_ids"], b2["input_ids"])
    assert torch.allclose(b1["pixel_values"], b2["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(model(**b1).logits, model2(**b2).logits, atol=1e-5)
    assert processor2.tokenizer.chat_template == processor.tokenizer.chat_template


def test_tiny_llama(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = build_tiny_llama(seed=0)
    text = tok.apply_chat_template([{"role": "user", "content": "Count to three."}],
                                   add_generation_prompt=True, tokenize=False)
    batch = tok([text], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]
    names = {n for n, _ in model.named_modules()}
    assert "model.layers.0.self_attn.q_proj" in names
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert t2(text)["input_ids"] == tok(text)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, m2(**batch).logits, atol=1e-5)


def test_trainer_step_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, processor = build_tiny_llava(seed=0)
    model.train()
    text = _prompt(processor) + "A cat.<|im_end|>"
    batch = processor(text=[text], images=[_image()], return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    row = {k: v[0] for k, v in batch.items()}
    row["labels"] = labels[0]
    before = model.model.multi_modal_projector.linear_1.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, learning_rate=1e-2,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=[row, row]).train()
    assert model.model.language_model.gradient_checkpointing
    assert not torch.equal(before, model.model.multi_modal_projector.linear_1.weight)
