"""The ``data:`` section of a training config: a mixture of datasets.

.. code-block:: yaml

    data:
      tasks: [vqa, caption]     # optional: fixes task ids (else: order of first appearance below)
      seed: 0                   # sampling and validation-split seed (int >= 0)
      num_samples: null         # draws per epoch (null: total number of training samples)
      val_fraction: 0.0         # held out of each dataset (or val_size: N per dataset)
      val_size: null
      on_error: raise           # raise | skip
      check_images: open        # none | exists | open | decode  (at load time)
      max_length: 2048          # tokens, image tokens included
      system_prompt: null       # null: the chat template's default (if any)
      image_aspect_ratio: original   # original | pad (LLaVA-1.5 pads to square)
      datasets:
        - task: vqa             # task name (`name:` alone is accepted as the task name)
          path: data/vqa.jsonl  # LLaVA JSON list or JSONL
          image_folder: data/images   # default: the data file's folder
          weight: 2.0           # share of draws (normalised over datasets); 0 = validation only
          val_fraction: 0.05    # optional per-dataset override (or val_size: N)
        - task: caption
          name: coco-caption    # optional dataset label for summaries (default: the task name)
          path: data/caption.json
          weight: 1.0
          val_path: data/caption_val.json   # optional: validation from a file instead of a split

Relative paths are resolved against ``base_dir`` when one is given to :meth:`MixtureConfig.from_dict`
(the CLI passes the current directory), else used as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ON_ERROR_CHOICES, DataError
from .images import CHECK_IMAGES_CHOICES

__all__ = ["DatasetSpec", "MixtureConfig"]


def _bad(message: str) -> DataError:
    return DataError("bad_config", f"data config: {message}")


def _check_keys(d: Mapping[str, Any], valid: list[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise _bad(f"{where} must be a mapping, got {type(d).__name__}")
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise _bad(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")


def _typed(d: Mapping[str, Any], key: str, kinds: tuple[type, ...], where: str, default: Any = None) -> Any:
    value = d.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise _bad(f"{where}.{key} must be {'/'.join(k.__name__ for k in kinds)}, got bool")
    if not isinstance(value, kinds):
        raise _bad(f"{where}.{key} must be {'/'.join(k.__name__ for k in kinds)}, got "
                   f"{type(value).__name__} ({value!r})")
    return value


def _fraction(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not (0.0 <= float(value) < 1.0):
        raise _bad(f"{where} must be in [0, 1), got {value}")
    return float(value)


def _count(value: Any, where: str, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if value < minimum:
        raise _bad(f"{where} must be an integer >= {minimum}, got {value}")
    return int(value)


@dataclass
class DatasetSpec:
    """One dataset of a mixture (see the module docstring for the YAML form)."""

    task: str
    path: Path
    image_folder: Path | None = None
    weight: float = 1.0
    name: str | None = None
    val_path: Path | None = None
    val_fraction: float | None = None
    val_size: int | None = None

    @property
    def label(self) -> str:
        """The dataset's label in summaries: ``name`` or the task name."""
        return self.name or self.task

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], index: int = 0, base_dir: str | Path | None = None) -> "DatasetSpec":
        where = f"datasets[{index}]"
        _check_keys(d, [f.name for f in fields(cls)], where)
        name = _typed(d, "name", (str,), where)
        task = _typed(d, "task", (str,), where) or name
        if not task:
            raise _bad(f"{where} needs a 'task' (the task name; 'name' alone is accepted too)")
        path = _typed(d, "path", (str, Path), where)
        if not path:
            raise _bad(f"{where} ({task}) needs a 'path' to a LLaVA JSON / JSONL file")

        def resolve(p: Any) -> Path | None:
            if p is None:
                return None
            p = Path(p).expanduser()
            return p if base_dir is None or p.is_absolute() else Path(base_dir) / p

        weight = _typed(d, "weight", (int, float), where, 1.0)
        if weight is None or not math.isfinite(weight) or weight < 0:
            raise _bad(f"{where}.weight must be a finite number >= 0, got {weight}")
        if d.get("val_size") is not None and d.get("val_fraction") is not None:
            raise _bad(f"{where}: give val_size or val_fraction, not both")
        if d.get("val_path") is not None and (d.get("val_size") is not None or d.get("val_fraction") is not None):
            raise _bad(f"{where}: val_path replaces the split; drop val_size / val_fraction")
        return cls(
            task=task,
            path=resolve(path),
            image_folder=resolve(_typed(d, "image_folder", (str, Path), where)),
            weight=float(weight),
            name=name if name and name != task else None,
            val_path=resolve(_typed(d, "val_path", (str, Path), where)),
            val_fraction=_fraction(_typed(d, "val_fraction", (int, float), where), f"{where}.val_fraction"),
            val_size=_count(_typed(d, "val_size", (int,), where), f"{where}.val_size"),
        )


@dataclass
class MixtureConfig:
    """The ``data:`` section (see the module docstring)."""

    datasets: list[DatasetSpec]
    tasks: list[str] | None = None
    seed: int = 0
    num_samples: int | None = None
    val_fraction: float = 0.0
    val_size: int | None = None
    on_error: str = "raise"
    check_images: str = "open"
    max_length: int = 2048
    system_prompt: str | None = None
    image_aspect_ratio: str = "original"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | Path | None = None) -> "MixtureConfig":
        """Parse and validate a ``data:`` mapping; raise :class:`DataError` (``bad_config``)."""
        valid = [f.name for f in fields(cls)]
        _check_keys(d, valid, "data")
        raw = d.get("datasets")
        if not isinstance(raw, list) or not raw:
            raise _bad("'datasets' must be a non-empty list of {task, path, image_folder, weight}")
        datasets = [DatasetSpec.from_dict(item, i, base_dir) for i, item in enumerate(raw)]
        labels = [s.label for s in datasets]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise _bad(f"several datasets are labelled {dupes}; give each a distinct 'name'")
        if sum(s.weight for s in datasets) <= 0:
            raise _bad("at least one dataset needs a weight > 0")
        tasks = d.get("tasks")
        if tasks is not None:
            if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
                raise _bad(f"'tasks' must be a list of task-name strings, got {tasks!r}")
            if len(set(tasks)) != len(tasks):
                raise _bad(f"'tasks' lists a name twice: {tasks}")
        if d.get("val_size") is not None and d.get("val_fraction") not in (None, 0, 0.0):
            raise _bad("data: give val_size or val_fraction, not both")
        seed = _typed(d, "seed", (int,), "data", 0)
        on_error = _typed(d, "on_error", (str,), "data", "raise")
        if on_error not in ON_ERROR_CHOICES:
            raise _bad(f"data.on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
        check_images = _typed(d, "check_images", (str,), "data", "open")
        if check_images not in CHECK_IMAGES_CHOICES:
            raise _bad(f"data.check_images must be one of {list(CHECK_IMAGES_CHOICES)}, got {check_images!r}")
        aspect = _typed(d, "image_aspect_ratio", (str,), "data", "original")
        if aspect not in ("original", "pad"):
            raise _bad(f"data.image_aspect_ratio must be 'original' or 'pad', got {aspect!r}")
        return cls(
            datasets=datasets,
            tasks=list(tasks) if tasks is not None else None,
            seed=_count(seed, "data.seed") or 0,
            num_samples=_count(_typed(d, "num_samples", (int,), "data"), "data.num_samples", 1),
            val_fraction=_fraction(_typed(d, "val_fraction", (int, float), "data", 0.0), "data.val_fraction") or 0.0,
            val_size=_count(_typed(d, "val_size", (int,), "data"), "data.val_size"),
            on_error=on_error,
            check_images=check_images,
            max_length=_count(_typed(d, "max_length", (int,), "data", 2048), "data.max_length", 1) or 2048,
            system_prompt=_typed(d, "system_prompt", (str,), "data"),
            image_aspect_ratio=aspect,
        )

    @classmethod
    def from_yaml(cls, path: str | Path, key: str | None = "data", base_dir: str | Path | None = None) -> "MixtureConfig":
        """Read ``path`` (YAML) and parse its ``key`` section (``None``: the whole file)."""
        import yaml

        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        if key is not None:
            if not isinstance(doc, Mapping) or key not in doc:
                raise _bad(f"{path} has no '{key}:' section")
            doc = doc[key]
        return cls.from_dict(doc, base_dir=base_dir)
