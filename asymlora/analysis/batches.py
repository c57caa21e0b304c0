"""Batches of the analyses: per-task lists of collated batches, task ids, and the language-model loss.

``batches_by_task`` maps a task name to a list of batches as :class:`asymlora.data.DataCollator`
makes them (``input_ids``, ``attention_mask``, ``labels``, optionally ``pixel_values``; the
bookkeeping keys ``task_ids``, ``sample_ids``, ``data_events`` are not passed to the model).
A batch's ``task_ids`` are used when it has them; otherwise every sample gets the task's id: its
index in the adapter's ``task_names`` when the task is listed there, else its position in
``batches_by_task``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOT_MODEL_INPUTS = ("task_ids", "sample_ids", "data_events")
IGNORE_INDEX = -100


def check_batches(batches_by_task: Mapping[str, Sequence[Mapping[str, Any]]], need_labels: bool) -> list[str]:
    """Task names, in order, after checking every task has batches (with labels when needed)."""
    if not batches_by_task:
        raise ValueError("batches_by_task is empty: give at least one task with a list of batches")
    for task, batches in batches_by_task.items():
        if isinstance(batches, Mapping) or not len(batches):
            raise ValueError(f"batches_by_task[{task!r}] must be a non-empty list of batches (dicts)")
        for k, batch in enumerate(batches):
            if "input_ids" not in batch:
                raise ValueError(f"batches_by_task[{task!r}][{k}] has no 'input_ids' (keys: {sorted(batch)})")
            if need_labels and "labels" not in batch:
                raise ValueError(f"batches_by_task[{task!r}][{k}] has no 'labels': the loss needs them")
    return list(batches_by_task)


def collate_task_batches(dataset: Sequence[Any], task_ids: Sequence[int], task_names: Sequence[str], collator: Any,
                         batches_per_task: int, batch_size: int) -> dict[str, list[dict[str, Any]]]:
    """``batches_by_task`` from a mixture's dataset: the first ``batches_per_task · batch_size``
    samples of each task (``task_ids[i]`` is sample i's task), collated ``batch_size`` at a time;
    tasks without samples are left out."""
    by_task: dict[int, list[int]] = {}
    for index, task in enumerate(task_ids):
        by_task.setdefault(task, []).append(index)
    out: dict[str, list[dict[str, Any]]] = {}
    for task, indices in by_task.items():
        indices = indices[: batches_per_task * batch_size]
        for start in range(0, len(indices), batch_size):
            batch = collator([dataset[i] for i in indices[start:start + batch_size]])
            batch.pop("data_events", None)
            batch.pop("sample_ids", None)
            out.setdefault(task_names[task], []).append(batch)
    return out


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def task_ids_for(model: nn.Module, task: str, position: int, batch: Mapping[str, Any]) -> Tensor:
    """``(batch,)`` task ids of one batch of ``task`` (see the module docstring)."""
    given = batch.get("task_ids")
    if given is not None:
        return torch.as_tensor(given, dtype=torch.long)
    names = getattr(model, "task_names", None) or []
    task_id = list(names).index(task) if task in names else position
    return torch.full((batch["input_ids"].shape[0],), task_id, dtype=torch.long)


def model_inputs(batch: Mapping[str, Any], device: torch.device, with_labels: bool) -> dict[str, Any]:
    """The keyword arguments of ``model(...)``: tensors moved to ``device``, bookkeeping keys dropped."""
    skip = NOT_MODEL_INPUTS + (() if with_labels else ("labels",))
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items() if k not in skip}


def language_model_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over positions whose label is not -100 (as transformers'
    causal-LM loss, without the router losses that ``outputs.loss`` of an AdapterModel adds).

    logits: (batch, seq, vocab); labels: (batch, seq). A batch with no labelled token gives 0.
    """
    shifted_logits = logits[:, :-1].float().flatten(0, 1)
    shifted_labels = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (shifted_labels != IGNORE_INDEX).sum().clamp_min(1)


def task_loss(model: nn.Module, task: str, position: int, batch: Mapping[str, Any]) -> Tensor:
    """The language-model loss of ``model`` on one batch of ``task`` (routing by its task ids)."""
    device = model_device(model)
    inputs = model_inputs(batch, device, with_labels=False)
    outputs = model(**inputs, task_ids=task_ids_for(model, task, position, batch).to(device))
    return language_model_loss(outputs.logits, batch["labels"])
