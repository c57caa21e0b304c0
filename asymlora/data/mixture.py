"""A multi-task mixture: datasets → task ids, train / validation samples, a weighted sampler.

Task ids are fixed when the :class:`Mixture` is built, at training start:

1. ``task_names`` passed to the constructor (the list saved with an adapter, for eval, export or
   resume) wins; a config ``tasks:`` list that disagrees with it is an error;
2. else the config's ``tasks:`` list;
3. else the order in which task names first appear in ``datasets:``.

``task_names[i]`` is the name of task id ``i``; the trainer saves ``mixture.task_names`` with the
adapter. A dataset whose task is not among them, or a record whose own ``task`` field is not, is
an ``unknown_task`` :class:`DataError` naming the task and the known ones (a dataset's is always
fatal; a record's follows ``on_error``).

Validation: per dataset, ``val_path`` (a separate file) if given, else ``val_size`` samples or
``round(val_fraction * n)`` (at least 1 when the fraction is > 0) held out at random. The held-out
set depends only on the seed, the dataset's label and its valid samples; it is kept in file order,
all datasets concatenated (not weighted).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import DatasetSpec, MixtureConfig
from .conversations import Conversation, load_conversations
from .dataset import SupervisedDataset
from .encode import ConversationEncoder
from .errors import DataError, DataSummary
from .sampling import MixtureSampler, weighted_draw

__all__ = ["Mixture", "load_mixture"]


def _unknown_task(name: str, known: Sequence[str], where: str) -> DataError:
    return DataError("unknown_task", f"{where}: unknown task {name!r}; known tasks: {list(known)}")


class Mixture:
    """The loaded and validated data of a run.

    Args:
        config: the parsed ``data:`` section.
        task_names: fixed task names (e.g. from a saved adapter); see the module docstring.
        summary: where load-time skips are counted (a new one if ``None``).

    Attributes:
        task_names: task id → name.
        train, val: the valid samples (each with ``task`` resolved), datasets concatenated in
            config order.
        train_task_ids, val_task_ids: the task id of each sample.
        train_sizes: number of training samples per dataset (in config order).
        summary: the :class:`DataSummary` (load-time skips, samples loaded per dataset).
    """

    def __init__(
        self,
        config: MixtureConfig,
        *,
        task_names: Sequence[str] | None = None,
        summary: DataSummary | None = None,
    ) -> None:
        self.config = config
        self.summary = summary if summary is not None else DataSummary()
        self.task_names = self._fix_task_names(config, task_names)
        self.train: list[Conversation] = []
        self.val: list[Conversation] = []
        self.train_task_ids: list[int] = []
        self.val_task_ids: list[int] = []
        self.train_sizes: list[int] = []
        for spec in config.datasets:
            self._add_dataset(spec)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: str | Path | None = None,
        task_names: Sequence[str] | None = None,
        summary: DataSummary | None = None,
    ) -> "Mixture":
        """Parse a ``data:`` mapping and load it."""
        return cls(MixtureConfig.from_dict(data, base_dir=base_dir), task_names=task_names, summary=summary)

    @staticmethod
    def _fix_task_names(config: MixtureConfig, task_names: Sequence[str] | None) -> list[str]:
        if task_names is not None:
            names = list(task_names)
            if len(set(names)) != len(names) or not all(isinstance(t, str) and t for t in names):
                raise DataError("bad_config", f"task_names must be distinct non-empty strings, got {names}")
            if config.tasks is not None and list(config.tasks) != names:
                raise DataError(
                    "bad_config",
                    f"data config: 'tasks' {list(config.tasks)} differs from the fixed task names "
                    f"{names} (saved with the adapter); task ids must not change",
                )
            source = "the fixed task names"
        elif config.tasks is not None:
            names, source = list(config.tasks), "the config's 'tasks' list"
        else:
            names = list(dict.fromkeys(spec.task for spec in config.datasets))
            source = ""
        for i, spec in enumerate(config.datasets):
            if spec.task not in names:
                raise _unknown_task(spec.task, names, f"data config: datasets[{i}] ({spec.path}), "
                                    f"tasks from {source}")
        return names

    def _load(self, path: Path, spec: DatasetSpec) -> list[Conversation]:
        cfg = self.config
        return load_conversations(path, spec.image_folder, on_error=cfg.on_error, summary=self.summary,  # type: ignore[arg-type]
                                  check_images=cfg.check_images, known_tasks=self.task_names)

    def _add_dataset(self, spec: DatasetSpec) -> None:
        cfg = self.config
        samples = self._load(spec.path, spec)
        if spec.val_path is not None:
            train, val = samples, self._load(spec.val_path, spec)
        else:
            train, val = self._split(samples, spec)
        if not train and spec.weight > 0:
            raise DataError(
                "bad_config",
                f"dataset {spec.label!r} ({spec.path}) has no valid training sample "
                f"(on_error={cfg.on_error}; {self.summary.num_skipped} skipped so far)",
            )
        for out, ids, items in ((self.train, self.train_task_ids, train), (self.val, self.val_task_ids, val)):
            for conv in items:
                task = conv.task or spec.task
                out.append(conv if conv.task == task else _with_task(conv, task))
                ids.append(self.task_names.index(task))
        self.train_sizes.append(len(train))
        self.summary.loaded[spec.label] = self.summary.loaded.get(spec.label, 0) + len(train) + len(val)

    def _split(self, samples: list[Conversation], spec: DatasetSpec) -> tuple[list[Conversation], list[Conversation]]:
        cfg = self.config
        n = len(samples)
        size = spec.val_size if spec.val_size is not None else cfg.val_size if spec.val_fraction is None else None
        if size is None:
            frac = spec.val_fraction if spec.val_fraction is not None else cfg.val_fraction
            size = max(1, int(np.floor(frac * n + 0.5))) if frac > 0 and n > 0 else 0
        if size == 0:
            return samples, []
        if size >= n:
            raise DataError(
                "bad_config",
                f"dataset {spec.label!r} ({spec.path}): a validation split of {size} leaves no "
                f"training sample out of {n}; lower val_size / val_fraction or use val_path",
            )
        rng = np.random.default_rng([cfg.seed, zlib.crc32(spec.label.encode("utf-8"))])
        held = set(rng.choice(n, size=size, replace=False).tolist())
        train = [s for i, s in enumerate(samples) if i not in held]
        val = [s for i, s in enumerate(samples) if i in held]
        return train, val

    # -- queries -----------------------------------------------------------------------------
    def task_id(self, name: str) -> int:
        """The id of task ``name``; an ``unknown_task`` :class:`DataError` if it is not one."""
        if name not in self.task_names:
            raise _unknown_task(name, self.task_names, "task lookup")
        return self.task_names.index(name)

    @property
    def weights(self) -> list[float]:
        return [spec.weight for spec in self.config.datasets]

    @property
    def num_samples(self) -> int:
        """Draws per epoch: ``config.num_samples``, else the number of training samples of the
        datasets with a weight > 0 (one epoch ≈ one pass's worth of samples, re-weighted)."""
        return self.config.num_samples or sum(n for n, w in zip(self.train_sizes, self.weights) if w > 0)

    def epoch_indices(self, epoch: int = 0) -> list[int]:
        """Indices into :attr:`train` for ``epoch`` (see :mod:`.sampling`)."""
        return weighted_draw(self.train_sizes, self.weights, self.num_samples, self.config.seed, epoch).tolist()

    def sampler(self, *, rank: int = 0, world_size: int = 1) -> MixtureSampler:
        """A ``DataLoader`` sampler over :attr:`train` (call ``set_epoch`` each epoch)."""
        return MixtureSampler(self.train_sizes, self.weights, self.num_samples, self.config.seed,
                              rank=rank, world_size=world_size)

    def encoder(self, processor: Any, **overrides: Any) -> ConversationEncoder:
        """A :class:`ConversationEncoder` with the config's ``max_length``, ``system_prompt``
        and ``image_aspect_ratio`` (``overrides`` win)."""
        kwargs: dict[str, Any] = dict(
            max_length=self.config.max_length,
            system_prompt=self.config.system_prompt,
            image_aspect_ratio=self.config.image_aspect_ratio,
        )
        kwargs.update(overrides)
        return ConversationEncoder(processor, **kwargs)

    def datasets(self, processor_or_encoder: Any) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        """``(train, val)`` torch datasets (``val`` is ``None`` when nothing is held out)."""
        enc = processor_or_encoder
        if not isinstance(enc, ConversationEncoder):
            enc = self.encoder(enc)
        on_error = self.config.on_error
        train = SupervisedDataset(self.train, self.train_task_ids, enc, on_error=on_error)  # type: ignore[arg-type]
        val = SupervisedDataset(self.val, self.val_task_ids, enc, on_error=on_error) if self.val else None  # type: ignore[arg-type]
        return train, val


def _with_task(conv: Conversation, task: str) -> Conversation:
    from dataclasses import replace

    return replace(conv, task=task)


def load_mixture(
    data: Mapping[str, Any] | MixtureConfig,
    *,
    base_dir: str | Path | None = None,
    task_names: Sequence[str] | None = None,
    summary: DataSummary | None = None,
) -> Mixture:
    """Build a :class:`Mixture` from a ``data:`` mapping or a parsed :class:`MixtureConfig`."""
    if isinstance(data, MixtureConfig):
        return Mixture(data, task_names=task_names, summary=summary)
    return Mixture.from_dict(data, base_dir=base_dir, task_names=task_names, summary=summary)
