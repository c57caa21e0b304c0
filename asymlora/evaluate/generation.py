"""Batched greedy generation for evaluation: prompts through the chat template, left padding,
task ids per sample (or none, for learned routing), answers decoded without the prompt."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..models.loading import load_image
from .samples import EvalSample


def build_prompt(processor, prompt: str, has_image: bool) -> str:
    """The chat-templated user turn (``<image>`` first, as LLaVA-1.5) with the generation prompt."""
    text = ("<image>\n" + prompt) if has_image and "<image>" not in prompt else prompt
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def make_generate_batch(model, processor, task_of: Callable[[EvalSample], int | None],
                        max_new_tokens: int = 32, device: str | torch.device | None = None
                        ) -> Callable[[Sequence[EvalSample]], list[str]]:
    """A ``generate_batch`` for :func:`asymlora.evaluate.runner.run_predictions`.

    ``task_of(sample)`` gives the task id to route by, or None for learned routing; a batch mixes
    tasks freely (each sample is routed by its own id).
    """
    device = device or next(model.parameters()).device
    tokenizer = getattr(processor, "tokenizer", processor)

    @torch.no_grad()
    def generate_batch(samples: Sequence[EvalSample]) -> list[str]:
        with_images = [s for s in samples if s.image is not None]
        if with_images and len(with_images) != len(samples):  # keep each generate call homogeneous
            by_kind = {id(s): None for s in samples}
            for group in (with_images, [s for s in samples if s.image is None]):
                for s, text in zip(group, generate_batch(group)):
                    by_kind[id(s)] = text
            return [by_kind[id(s)] for s in samples]
        texts = [build_prompt(processor, s.prompt, s.image is not None) for s in samples]
        kwargs = dict(text=texts, return_tensors="pt", padding=True)
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            if with_images:
                inputs = processor(images=[load_image(s.image) for s in samples], **kwargs)
            else:
                inputs = tokenizer(texts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = old_side
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ids = [task_of(s) for s in samples]
        task_ids = None if any(i is None for i in ids) else torch.tensor(ids, device=device)
        out = model.generate(**inputs, task_ids=task_ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

    return generate_batch
