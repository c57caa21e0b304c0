"""Run configuration: one YAML file with the sections ``model``, ``adapter``, ``data``, ``train``.

Every knob is visible in the file (see ``configs/``); ``--set section.key=value`` overrides any
of them from the command line, the value parsed as YAML. Unknown keys are errors that name the
file and the key path, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters.config import ConfigError, matches_type, type_name
from ..adapters.inject import config_from_dict

ADAPTER_METHODS = ("lora", "asymlora", "lora_moe", "mixlora")


@dataclass
class ModelSection:
    """``name_or_path``: "tiny-llava", "smol-llava" or a local llava-hf folder (LLaVA-1.5-7B:
    config.json with model_type llava, *.safetensors, tokenizer and processor files)."""

    name_or_path: str = "tiny-llava"
    dtype: str = "float32"  # float32 | bfloat16: the frozen base's storage dtype
    gradient_checkpointing: bool = False


@dataclass
class TrainSection:
    output_dir: str = "runs/default"
    seed: int = 0
    learning_rate: float = 2e-4  # adapter (LoRA) learning rate, the papers' 2e-4
    projector_learning_rate: float | None = 2e-5  # modules_to_save (LLaVA's projector); None: learning_rate
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    max_steps: int = 100
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no | bf16 (autocast; the base may also be stored in bf16)
    logging_steps: int = 10
    save_steps: int = 50
    save_total_limit: int | None = 2
    router_stats_steps: int = 10  # collect router usage / entropy every this many steps
    num_workers: int = 0
    stop_after_steps: int | None = None  # stop (with a checkpoint) before max_steps, e.g. to test resume
    eval_steps: int | None = None  # validation loss every this many steps (needs a validation split)
    tensorboard: bool = True


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: dict[str, Any] = field(default_factory=lambda: {"method": "asymlora"})
    data: dict[str, Any] = field(default_factory=dict)
    train: TrainSection = field(default_factory=TrainSection)
    source: str = "<config>"

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "adapter": dict(self.adapter), "data": self.data,
                "train": dataclasses.asdict(self.train)}


def _section(cls, data: Any, name: str, source: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if not matches_type(value, hints[key]):
            raise ConfigError(f"{source}: {name}.{key} must be {type_name(hints[key])}, got {value!r:.200}")
        if isinstance(value, int) and not isinstance(value, bool) and not matches_type(value, int | None):
            value = float(value)  # an int given for a float field
        values[key] = value
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-4"`` -> (["train", "learning_rate"], 1e-4); the value is YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.max_steps=10")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        return parts, yaml.safe_load(value) if value.strip() else None
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {err}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return raw


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a run config") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with model / adapter / data / train")
    raw = apply_overrides(raw, overrides or [])
    return run_config_from_dict(raw, str(path), base_dir=path.parent)


def run_config_from_dict(raw: dict[str, Any], source: str = "<config>", base_dir: str | Path | None = None) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with model / adapter / data / train")
    unknown = sorted(set(raw) - {"model", "adapter", "data", "train"}, key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid: model, adapter, data, train")
    adapter = raw.get("adapter") or {"method": "asymlora"}
    if not isinstance(adapter, dict):
        raise ConfigError(f"{source}: section 'adapter' must be a mapping")
    config = RunConfig(
        model=_section(ModelSection, raw.get("model"), "model", source),
        adapter=dict(adapter),
        data=raw.get("data") or {},
        train=_section(TrainSection, raw.get("train"), "train", source),
        source=source,
    )
    validate(config, base_dir)
    return config


def validate(config: RunConfig, base_dir: str | Path | None = None) -> None:
    t, source = config.train, config.source
    checks = [
        (t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps must be >= 1"),
        (t.learning_rate > 0, "train.learning_rate must be > 0"),
        (t.lr_scheduler in ("cosine", "linear", "constant"), "train.lr_scheduler must be cosine, linear or constant"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio must lie in [0, 1)"),
        (t.mixed_precision in ("no", "bf16"), "train.mixed_precision must be 'no' or 'bf16'"),
        (config.model.dtype in ("float32", "bfloat16"), "model.dtype must be float32 or bfloat16"),
        (t.save_steps >= 1 and t.logging_steps >= 1, "train.save_steps and train.logging_steps must be >= 1"),
        (t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps must be >= 0 (or null)"),
        (t.projector_learning_rate is None or t.projector_learning_rate > 0, "train.projector_learning_rate must be > 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm must be > 0 (or null: no clipping)"),
        (t.save_total_limit is None or t.save_total_limit >= 1, "train.save_total_limit must be >= 1 (or null: keep all)"),
        (t.num_workers >= 0, "train.num_workers must be >= 0"),
        (t.stop_after_steps is None or t.stop_after_steps >= 1, "train.stop_after_steps must be >= 1 (or null)"),
        (t.eval_steps is None or t.eval_steps >= 1, "train.eval_steps must be >= 1 (or null)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
    adapter_config(config)  # validates the adapter section
    if not config.data:
        raise ConfigError(f"{source}: section 'data' is missing: it lists the datasets of the mixture")
    if not isinstance(config.data, dict):
        raise ConfigError(f"{source}: section 'data' must be a mapping with 'datasets', got {type(config.data).__name__}")


def adapter_config(config: RunConfig, task_names: list[str] | None = None):
    """The adapter section as an asymlora config, or a peft.LoraConfig for ``method: lora``."""
    section = dict(config.adapter)
    method = section.get("method")
    where = f"{config.source}: adapter"
    if method not in ADAPTER_METHODS:
        raise ConfigError(f"{where}.method must be one of {ADAPTER_METHODS}, got {method!r}")
    if task_names is not None:
        section["task_names"] = list(task_names)
    if method == "lora":
        from peft import LoraConfig

        from ..adapters.config import DEFAULT_EXCLUDE_MODULES, DEFAULT_MODULES_TO_SAVE, DEFAULT_TARGET_MODULES

        section.pop("method")
        names = section.pop("task_names", None)
        if names is not None and not matches_type(names, list[str]):
            raise ConfigError(f"{where}.task_names must be a list of task names, got {names!r:.200}")
        hints = typing.get_type_hints(LoraConfig)
        for key, value in section.items():
            hint = float if key == "lora_alpha" else hints.get(key)  # PEFT annotates int but takes any number
            if hint is not None and not matches_type(value, hint):
                raise ConfigError(f"{where}.{key} must be {type_name(hint)}, got {value!r:.200}")
        if section.get("r", 8) < 1 or section.get("lora_alpha", 8) <= 0 or not 0 <= section.get("lora_dropout", 0.0) < 1:
            raise ConfigError(f"{where}: r must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1)")
        section.setdefault("target_modules", list(DEFAULT_TARGET_MODULES))
        section.setdefault("exclude_modules", DEFAULT_EXCLUDE_MODULES)
        section.setdefault("modules_to_save", list(DEFAULT_MODULES_TO_SAVE))
        try:
            lora = LoraConfig(task_type="CAUSAL_LM", **section)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from None
        lora._asymlora_task_names = names
        return lora
    return config_from_dict(section, where)
