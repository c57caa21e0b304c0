"""The ChatML chat template shared by the tiny models and smol-llava.

It is SmolLM2-Instruct's template (``<|im_start|>role\\n...<|im_end|>\\n``) extended so that a
message's ``content`` may also be a list of LLaVA-style items (``{"type": "image"}`` and
``{"type": "text", "text": ...}``); each image item becomes the ``<image>`` placeholder followed
by a newline, which the processor then expands into one token per visual token.

Assistant turns are wrapped in ``{% generation %}`` blocks so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the tokens to train on.
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

# SmolLM2-Instruct's default system prompt (used when a conversation has none).
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_CONTENT = (
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '" + IMAGE_TOKEN + "\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
)


def chatml_template(default_system: str | None = SMOLLM2_SYSTEM) -> str:
    """Return the Jinja ChatML template; ``default_system`` is inserted when the first message is
    not a system message (``None``: no default system turn)."""
    head = ""
    if default_system:
        head = (
            "{%- if loop.first and messages[0]['role'] != 'system' -%}"
            "{{- '" + IM_START + "system\\n" + default_system.replace("'", "\\'") + IM_END + "\\n' -}}"
            "{%- endif -%}"
        )
    return (
        "{%- for message in messages -%}"
        + head
        + "{{- '" + IM_START + "' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}" + _CONTENT + "{{- '" + IM_END + "' -}}{%- endgeneration -%}"
        "{{- '\\n' -}}"
        "{%- else -%}"
        + _CONTENT
        + "{{- '" + IM_END + "\\n' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\\n' -}}{%- endif -%}"
    )


def clip_image_processor(size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """A CLIP-style image processor (resize shortest edge, centre crop, normalise) that does not
    need torchvision: transformers >= 5.2x ships a PIL/numpy ``CLIPImageProcessorPil``; older 5.x
    releases call the slow one ``CLIPImageProcessor``."""
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers 5.x: CLIPImageProcessor is the slow one
        from transformers import CLIPImageProcessor as cls
    return cls(
        do_resize=True,
        size={"shortest_edge": size},
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )
