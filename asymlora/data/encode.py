"""Tokenising a conversation through the model's chat template, with the label mask.

How the labels are found (template-agnostic; compare LLaVA's ``preprocess_v1``, which splits the
rendered text on the conversation separator and re-tokenises each round to count instruction
tokens — that is tied to one template, and a count mismatch masks the whole sample with only a
printed warning):

1. The messages (human → ``user``, gpt → ``assistant``, optional ``system_prompt`` first) are
   rendered with the chat template; a template's own default system prompt is rendered too.
2. For every assistant message *i*, ``render(messages[:i], add_generation_prompt=True)`` and
   ``render(messages[:i + 1])`` are prefixes of the full text; the characters between them are
   the answer plus the template's end-of-turn marker (trailing whitespace after it, such as
   ChatML's ``"\\n"`` after ``<|im_end|>``, is not part of the span). A template for which these
   are not prefixes is refused with a ``ValueError``.
3. The full text is tokenised once with offsets; a token is a label iff its characters overlap
   an answer span. Everything else (system, user turns, role headers, image tokens) is -100.
4. With images, the model's processor is called on the same text and images; it expands each
   ``<image>`` into the model's run of image tokens and returns ``pixel_values``; the labels are
   expanded along (image tokens are -100).

Over-long samples are cut to ``max_length`` from the right; a cut never splits an image's token
run (it moves before the run and that image's pixel values are dropped). Each truncation is a
:class:`~asymlora.data.errors.DataEvent` (``"truncated"``), counted in the run's summary; a
sample left with no assistant token is a ``no_labels_after_truncation`` :class:`DataError`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .conversations import IMAGE_PLACEHOLDER, Conversation
from .errors import TRUNCATED, DataError, DataEvent
from .images import expand_to_square, load_image

__all__ = ["IGNORE_INDEX", "EncodedSample", "ConversationEncoder"]

#: Label value that the loss ignores.
IGNORE_INDEX = -100

_PROBE = "asymlora-content-probe"


@dataclass
class EncodedSample:
    """One tokenised sample, ready for :class:`~asymlora.data.collate.DataCollator`.

    A dataclass rather than a dict, so that ``transformers.Trainer``'s column remover leaves the
    non-model fields alone.

    Attributes:
        input_ids: token ids (image placeholders already expanded).
        labels: same length; ``IGNORE_INDEX`` except on assistant tokens.
        pixel_values: ``(num_images, C, H, W)`` float tensor, or ``None`` for text-only samples.
        task_id: the sample's task id.
        sample_id: the record's ``id``.
        events: truncations / skips that happened while producing this sample.
    """

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None = None
    task_id: int = 0
    sample_id: str = ""
    events: list[DataEvent] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


class ConversationEncoder:
    """Turns a :class:`~asymlora.data.conversations.Conversation` into an :class:`EncodedSample`.

    Args:
        processor: a multimodal processor (``LlavaProcessor``-like: ``.tokenizer``,
            ``.image_processor``, ``.image_token``, callable on ``text=, images=``) or a plain
            (fast) tokenizer for text-only models.
        max_length: samples longer than this (in tokens, image tokens included) are truncated.
        system_prompt: if given, a system message put before every conversation. If ``None``,
            the template's default system prompt (if it has one) is used.
        image_aspect_ratio: ``"original"`` (the processor's resize / crop) or ``"pad"``
            (LLaVA-1.5: pad to a square with the image mean colour first).
        chat_template: a Jinja template overriding the tokenizer's / processor's.
        content_format: how message content is passed to the template: ``"string"`` (the text
            with inline ``<image>``), ``"list"`` (``[{"type": "image"}, {"type": "text", ...}]``,
            as llava-hf processor templates expect) or ``"auto"`` (probe the template).
    """

    def __init__(
        self,
        processor: Any,
        max_length: int = 2048,
        *,
        system_prompt: str | None = None,
        image_aspect_ratio: Literal["original", "pad"] = "original",
        chat_template: str | None = None,
        content_format: Literal["auto", "string", "list"] = "auto",
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if image_aspect_ratio not in ("original", "pad"):
            raise ValueError(f"image_aspect_ratio must be 'original' or 'pad', got {image_aspect_ratio!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.max_length = int(max_length)
        self.system_prompt = system_prompt
        self.image_aspect_ratio = image_aspect_ratio
        self.image_token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
        self.image_token_id: int | None = None
        if self.image_processor is not None:
            self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        template = (
            chat_template
            or getattr(self.tokenizer, "chat_template", None)
            or getattr(processor, "chat_template", None)
        )
        if not isinstance(template, str) or not template:
            raise ValueError(
                f"{type(processor).__name__} has no chat template (a single Jinja string); "
                "pass chat_template=... to ConversationEncoder"
            )
        self.chat_template = template
        if content_format not in ("auto", "string", "list"):
            raise ValueError(f"content_format must be 'auto', 'string' or 'list', got {content_format!r}")
        self.content_format = self._detect_format() if content_format == "auto" else content_format
        self._warned = False

    # -- rendering ---------------------------------------------------------------------------
    def _detect_format(self) -> str:
        try:
            text = self._render_raw([{"role": "user", "content": _PROBE}], False)
            if _PROBE in text:
                return "string"
        except Exception:
            pass
        return "list"

    def _render_raw(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _content(self, text: str) -> Any:
        if self.image_token != IMAGE_PLACEHOLDER:
            text = text.replace(IMAGE_PLACEHOLDER, self.image_token)
        if self.content_format == "string":
            return text
        items: list[dict[str, str]] = []
        for k, part in enumerate(text.split(self.image_token)):
            if k > 0:
                items.append({"type": "image"})
            if part:
                items.append({"type": "text", "text": part})
        return items

    def messages(self, conv: Conversation) -> list[dict[str, Any]]:
        """The chat-template messages of ``conv`` (with the system prompt, if set)."""
        msgs = [{"role": m["role"], "content": self._content(m["content"])} for m in conv.messages()]
        if self.system_prompt is not None:
            msgs.insert(0, {"role": "system", "content": self._content(self.system_prompt)})
        return msgs

    def render(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text and the character spans of the assistant answers (each with
        its end-of-turn marker)."""
        msgs = self.messages(conv)
        full = self._render_raw(msgs, False)
        spans: list[tuple[int, int]] = []
        for i, msg in enumerate(msgs):
            if msg["role"] != "assistant":
                continue
            prompt = self._render_raw(msgs[:i], True)
            upto = self._render_raw(msgs[: i + 1], False)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise ValueError(
                    "the chat template is not prefix-stable (rendering the conversation up to "
                    f"message {i} is not a prefix of the full rendering), so the assistant tokens "
                    f"of sample {conv.id!r} ({conv.location}) cannot be located; use a template "
                    "that renders earlier turns identically"
                )
            answer = upto[len(prompt):].rstrip()
            spans.append((len(prompt), len(prompt) + len(answer)))
        return full, spans

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, conv: Conversation, task_id: int = 0) -> EncodedSample:
        """Tokenise ``conv``; raise :class:`DataError` for an unreadable image or a sample with
        no assistant token left after truncation."""
        text, spans = self.render(conv)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        is_label = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            is_label |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, is_label)]

        pixel_values: torch.Tensor | None = None
        image_runs: list[tuple[int, int]] = []
        if conv.images:
            ids, labels, pixel_values, image_runs = self._with_images(conv, text, ids, labels)
        return self._finish(conv, task_id, ids, labels, pixel_values, image_runs)

    def _load_images(self, conv: Conversation) -> list:
        images = []
        for path in conv.images:
            try:
                img = load_image(path)
            except Exception as exc:
                raise DataError(
                    "unreadable_image",
                    f"{conv.location}: sample {conv.id!r}: cannot read image {path}: "
                    f"{type(exc).__name__}: {exc}",
                    location=conv.location,
                    sample_id=conv.id,
                ) from None
            if self.image_aspect_ratio == "pad":
                mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
                img = expand_to_square(img, tuple(int(round(x * 255)) for x in mean))
            images.append(img)
        return images

    def _with_images(self, conv: Conversation, text: str, ids: list[int], labels: list[int]):
        if self.image_processor is None or self.image_token_id is None:
            raise ValueError(
                f"sample {conv.id!r} ({conv.location}) has images but {type(self.processor).__name__} "
                "has no image processor; use the model's multimodal processor"
            )
        images = self._load_images(conv)
        out = self.processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt")
        expanded = out["input_ids"][0].tolist()
        pixel_values = out["pixel_values"]
        img_id = self.image_token_id
        new_labels: list[int] = []
        runs: list[tuple[int, int]] = []
        i = j = 0
        while i < len(ids):
            if ids[i] != img_id:
                if j >= len(expanded) or expanded[j] != ids[i]:
                    raise ValueError(self._misaligned(conv))
                new_labels.append(labels[i])
                i += 1
                j += 1
                continue
            k = i
            while k < len(ids) and ids[k] == img_id:
                k += 1
            n_placeholders = k - i
            start = j
            while j < len(expanded) and expanded[j] == img_id:
                j += 1
            length = j - start
            if length == 0 or length % n_placeholders:
                raise ValueError(self._misaligned(conv))
            per = length // n_placeholders
            runs.extend((start + p * per, start + (p + 1) * per) for p in range(n_placeholders))
            new_labels.extend([IGNORE_INDEX] * length)
            i = k
        if j != len(expanded) or len(runs) != len(images) or pixel_values.shape[0] != len(images):
            raise ValueError(self._misaligned(conv))
        return expanded, new_labels, pixel_values, runs

    def _misaligned(self, conv: Conversation) -> str:
        return (
            f"sample {conv.id!r} ({conv.location}): the processor's token ids do not match the "
            f"tokenizer's with each {self.image_token} expanded into a run of image tokens (one "
            "pixel_values row per image); this encoder supports LLaVA-style processors only"
        )

    def _finish(self, conv, task_id, ids, labels, pixel_values, image_runs) -> EncodedSample:
        events: list[DataEvent] = []
        n = len(ids)
        if n > self.max_length:
            cut = self.max_length
            for start, end in image_runs:
                if start < cut < end:
                    cut = start
            kept = sum(1 for _, end in image_runs if end <= cut)
            ids, labels = ids[:cut], labels[:cut]
            if pixel_values is not None:
                pixel_values = pixel_values[:kept] if kept else None
            events.append(DataEvent(TRUNCATED, conv.location,
                                    f"{conv.location}: sample {conv.id!r}: {n} tokens cut to {cut} "
                                    f"(max_length={self.max_length})"))
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"samples longer than max_length={self.max_length} tokens are truncated; "
                    "the number of truncated samples is reported in the data summary",
                    stacklevel=3,
                )
        if all(label == IGNORE_INDEX for label in labels):
            if n > len(ids):
                what = (f"after truncation to max_length={self.max_length} no assistant token "
                        f"is left (the sample has {n} tokens); raise max_length or shorten the prompt")
            else:
                what = "the chat template rendered no assistant token to train on"
            raise DataError("no_labels_after_truncation", f"{conv.location}: sample {conv.id!r}: {what}",
                            location=conv.location, sample_id=conv.id)
        return EncodedSample(
            input_ids=ids,
            labels=labels,
            pixel_values=pixel_values,
            task_id=int(task_id),
            sample_id=conv.id,
            events=events,
        )
