"""Random-weight tiny models built from configs, for fast offline tests.

``build_tiny_llava`` returns transformers' stock ``LlavaForConditionalGeneration`` (CLIP vision
tower, Llama language model) with a ``LlavaProcessor`` whose tokenizer is a byte-level BPE trained
in code on a fixed corpus, so nothing is downloaded. The layout matches LLaVA-1.5 and smol-llava:

    model.language_model.layers.N.self_attn.{q,k,v,o}_proj
    model.language_model.layers.N.mlp.{gate,up,down}_proj
    model.multi_modal_projector.linear_{1,2}
    model.vision_tower.vision_model...
    lm_head

An image becomes 49 visual tokens (56x56 pixels, 8x8 patches, CLS dropped), the same count as
smol-llava's 7x7 EfficientNet grid.
"""

from __future__ import annotations

from typing import Any

import torch

from .chat import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    PAD_TOKEN,
    chatml_template,
    clip_image_processor,
)

__all__ = ["build_tiny_tokenizer", "build_tiny_llava", "build_tiny_llama", "TINY_SPECIAL_TOKENS"]

TINY_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD_TOKEN, IMAGE_TOKEN]  # ids 0..4

# A fixed corpus for the BPE merges: chat words, the demo's task vocabulary, digits.
_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "What is in the image? Describe the image. Answer with a single word or phrase.",
    "The image shows a cat, a dog, a horse, a rocket, a cup of coffee, an astronaut, some text.",
    "What colour is the shape? red green blue yellow black white orange purple grey brown",
    "How many objects are there? zero one two three four five six seven eight nine ten",
    "Which digit is shown? 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14",
    "Is the circle left of the square? yes no left right above below top bottom middle",
    "Question: Answer: Caption: The answer is A. B. C. D. Options: true false",
    "The quick brown fox jumps over the lazy dog. A small square, a large circle, a triangle.",
    "Translate, summarise, classify, count, locate, read the text, compare the two images.",
]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text round-trips) trained in code on a fixed corpus,
    wrapped in ``PreTrainedTokenizerFast``, with ChatML specials, ``<pad>`` and ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        unk_token=ENDOFTEXT,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
        model_max_length=2048,
    )
    fast.chat_template = chatml_template(default_system=None)
    return fast


def _text_config_kwargs(tokenizer) -> dict[str, Any]:
    vocab = len(tokenizer)
    return dict(
        vocab_size=((vocab + 63) // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )


_VISION_DEFAULTS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=56,
    patch_size=8,
    num_channels=3,
    projection_dim=32,
)


def _fix_generation_config(model, tokenizer) -> None:
    gc = model.generation_config
    gc.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    gc.pad_token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    gc.bos_token_id = tokenizer.convert_tokens_to_ids(IM_START)


def build_tiny_llava(seed: int = 0, **overrides):
    """Random-weight tiny LLaVA (stock ``LlavaForConditionalGeneration``) and its ``LlavaProcessor``.

    ``overrides`` go to the text config when they name a ``LlamaConfig`` field (``hidden_size``,
    ``num_hidden_layers``, ...), to the vision config when prefixed ``vision_``
    (``vision_hidden_size=48``), to ``LlavaConfig`` otherwise (``projector_hidden_act``, ...), and
    ``dtype`` sets the parameters' dtype. Weights depend only on ``seed``; the global RNG is left
    untouched.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    dtype = overrides.pop("dtype", None)
    tokenizer = build_tiny_tokenizer()
    text_kw = _text_config_kwargs(tokenizer)
    vision_kw = dict(_VISION_DEFAULTS)
    top_kw: dict[str, Any] = {}
    text_fields = set(LlamaConfig().to_dict())
    for key, value in overrides.items():
        if key.startswith("vision_") and key[len("vision_"):] in CLIPVisionConfig().to_dict():
            vision_kw[key[len("vision_"):]] = value
        elif key in text_fields or key in text_kw:
            text_kw[key] = value
        else:
            top_kw[key] = value
    image_size, patch_size = vision_kw["image_size"], vision_kw["patch_size"]
    num_image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        text_config=LlamaConfig(**text_kw),
        vision_config=CLIPVisionConfig(**vision_kw),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=text_kw["tie_word_embeddings"],
        **top_kw,
    )
    config.pad_token_id = text_kw["pad_token_id"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    _fix_generation_config(model, tokenizer)
    processor = LlavaProcessor(
        image_processor=clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_llama(seed: int = 0, **overrides):
    """Random-weight tiny text-only ``LlamaForCausalLM`` (same text tower as ``build_tiny_llava``)
    and its tokenizer. ``overrides`` go to ``LlamaConfig``; ``dtype`` sets the parameters' dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = overrides.pop("dtype", None)
    tokenizer = build_tiny_tokenizer()
    text_kw = _text_config_kwargs(tokenizer)
    text_kw.update(overrides)
    config = LlamaConfig(**text_kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    _fix_generation_config(model, tokenizer)
    return model, tokenizer
