"""A map-style torch dataset that encodes conversations lazily (images are opened on access)."""

from __future__ import annotations

from typing import Sequence

import torch

from .conversations import Conversation
from .encode import ConversationEncoder, EncodedSample
from .errors import DataError, DataEvent, OnError, check_on_error

__all__ = ["SupervisedDataset"]


class SupervisedDataset(torch.utils.data.Dataset):
    """``dataset[i]`` is ``encoder.encode(samples[i], task_ids[i])`` as an :class:`EncodedSample`.

    Errors found while encoding (an image that fails to decode, no assistant token left after
    truncation) follow ``on_error``: ``"raise"`` raises the :class:`DataError`; ``"skip"``
    returns instead the next sample of the *same task* (cyclically; at most ``max_retries``
    tries) and attaches the skip to its ``events``, so that the count reaches the trainer's
    summary through ``batch["data_events"]`` even from ``DataLoader`` worker processes. The
    substitute keeps batch sizes and the sampler's task proportions intact.
    """

    def __init__(
        self,
        samples: Sequence[Conversation],
        task_ids: Sequence[int],
        encoder: ConversationEncoder,
        *,
        on_error: OnError = "raise",
        max_retries: int = 16,
    ) -> None:
        if len(samples) != len(task_ids):
            raise ValueError(f"{len(samples)} samples but {len(task_ids)} task ids")
        self.samples = list(samples)
        self.task_ids = [int(t) for t in task_ids]
        self.encoder = encoder
        self.on_error = check_on_error(on_error)
        self.max_retries = max_retries

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> EncodedSample:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        task = self.task_ids[index]
        skipped: list[DataEvent] = []
        j, tries = index, 0
        for _ in range(n):
            if self.task_ids[j] == task:
                try:
                    item = self.encoder.encode(self.samples[j], self.task_ids[j])
                except DataError as err:
                    if self.on_error == "raise":
                        raise
                    skipped.append(err.to_event())
                    tries += 1
                    if tries >= self.max_retries:
                        break
                else:
                    item.events = skipped + item.events
                    return item
            j = (j + 1) % n
        raise DataError(
            skipped[-1].reason if skipped else "bad_config",
            f"on_error=skip: {len(skipped)} sample(s) of task id {task} failed in a row from "
            f"index {index}; the last: {skipped[-1].message if skipped else '?'}",
        )
