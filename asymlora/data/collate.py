"""Padding encoded samples into a batch.

The batch is a dict with exactly these keys:

==================  =======================================  =========================================
key                 type                                     content
==================  =======================================  =========================================
``input_ids``       ``LongTensor (B, L)``                    padded with the tokenizer's pad id
``attention_mask``  ``LongTensor (B, L)``                    1 on tokens, 0 on padding
``labels``          ``LongTensor (B, L)``                    -100 except assistant tokens
``pixel_values``    ``FloatTensor (N, C, H, W)``             only if the batch has images (N >= 1)
``task_ids``        ``LongTensor (B,)``                      task id of each sample
``sample_ids``      ``list[str]``                            record ids, for error reports
``data_events``     ``list[DataEvent]``                      truncations / skips while encoding
==================  =======================================  =========================================

Text-only and image samples mix freely: ``pixel_values`` holds the images of the samples that have
them, concatenated in batch order (sample by sample, each sample's images in placeholder order),
and nothing for text-only samples. ``LlavaForConditionalGeneration`` scatters the image features
into the image-token positions in that same order, and requires exactly one image per run of image
tokens, which this gives. A batch with no image has no ``pixel_values`` key. (Consequence: with
DDP, a step where one rank sees no image leaves the vision tower / projector without gradients on
that rank; with a frozen tower and ``find_unused_parameters`` or grouped batches this is harmless.)

Before ``model(**batch)`` the trainer pops ``task_ids`` (to set the routing), ``sample_ids`` and
``data_events`` (``DataSummary.add_events``).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from .encode import IGNORE_INDEX, EncodedSample

__all__ = ["DataCollator", "BATCH_KEYS"]

#: All keys a batch can have (``pixel_values`` only when it has images).
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "task_ids", "sample_ids", "data_events")


def _get(example: EncodedSample | Mapping[str, Any], key: str, default: Any = None) -> Any:
    if isinstance(example, Mapping):
        return example.get(key, default)
    return getattr(example, key, default)


class DataCollator:
    """Pads :class:`~asymlora.data.encode.EncodedSample` s (or dicts with the same fields).

    Args:
        pad_token_id: id used to pad ``input_ids``.
        padding_side: ``"right"`` for training (default) or ``"left"`` (generation).
        pad_to_multiple_of: round the padded length up to a multiple of this.
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        padding_side: Literal["right", "left"] = "right",
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_processor(cls, processor: Any, **kwargs: Any) -> "DataCollator":
        """Use the pad token of ``processor`` (or of its ``.tokenizer``)."""
        tok = getattr(processor, "tokenizer", processor)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            raise ValueError(
                f"{type(tok).__name__} has no pad token; set tokenizer.pad_token (e.g. to a reserved "
                "token) or pass pad_token_id to DataCollator"
            )
        return cls(pad, **kwargs)

    def __call__(self, examples: Sequence[EncodedSample | Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        lengths = [len(_get(e, "input_ids")) for e in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        batch = len(examples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        pixel_values: list[torch.Tensor] = []
        task_ids: list[int] = []
        sample_ids: list[str] = []
        events: list[Any] = []
        for row, (example, n) in enumerate(zip(examples, lengths)):
            ids = torch.as_tensor(_get(example, "input_ids"), dtype=torch.long)
            lab = torch.as_tensor(_get(example, "labels"), dtype=torch.long)
            if lab.shape != ids.shape:
                raise ValueError(f"sample {_get(example, 'sample_id')!r}: labels and input_ids differ in length")
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[row, cols] = ids
            labels[row, cols] = lab
            attention_mask[row, cols] = 1
            pv = _get(example, "pixel_values")
            if pv is not None and len(pv):
                pixel_values.append(torch.as_tensor(pv))
            task_ids.append(int(_get(example, "task_id", 0)))
            sample_ids.append(str(_get(example, "sample_id", "")))
            events.extend(_get(example, "events", None) or [])
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        if pixel_values:
            shapes = {tuple(p.shape[1:]) for p in pixel_values}
            if len(shapes) > 1:
                raise ValueError(
                    f"images of one batch must have the same processed shape, got {sorted(shapes)} "
                    f"(samples {sample_ids}); use a processor that resizes to a fixed size"
                )
            out["pixel_values"] = torch.cat(pixel_values, dim=0)
        out["task_ids"] = torch.tensor(task_ids, dtype=torch.long)
        out["sample_ids"] = sample_ids
        out["data_events"] = events
        return out
