"""Configuration shared by every adapter method, with validation that names the offending field.

Vocabulary follows PEFT (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
``modules_to_save``) so a PEFT user reads these configs without a manual.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .routing import GRANULARITIES, LOAD_BALANCING, ROUTINGS

# The LLM's linear layers of a LLaMA-family decoder (LLaVA-1.5's Vicuna, SmolLM2).
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Never adapt the vision tower; the projector is trained whole through modules_to_save instead.
DEFAULT_EXCLUDE_MODULES = r".*(vision_tower|vision_model|multi_modal_projector).*"
DEFAULT_MODULES_TO_SAVE = ["multi_modal_projector"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what would be valid."""


def _fail(config: Any, name: str, message: str) -> None:
    raise ConfigError(f"{type(config).__name__}.{name} {message}")


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a field annotation: ``int`` (not bool), ``float`` (int or float, finite),
    ``bool``, ``str``, ``None``, ``list[X]`` (a list or tuple of X), ``Literal[...]``, ``dict``, a
    class, and unions of these."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(matches_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if origin in (dict, tuple):
        return isinstance(value, (dict,) if origin is dict else (list, tuple))
    return isinstance(value, hint)


def type_name(hint: Any) -> str:
    """``list[str] | str`` -> "list[str] | str" (how errors describe a field's type)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list[{type_name(typing.get_args(hint)[0])}]"
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    return "null" if hint is type(None) else ("finite float" if hint is float else getattr(hint, "__name__", str(hint)))


def check_field_types(config: Any) -> None:
    """Raise ConfigError naming the first field of the dataclass ``config`` whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not matches_type(value, hints[f.name]):
            _fail(config, f.name, f"must be {type_name(hints[f.name])}, got {value!r:.200}")


@dataclass
class AdapterConfig:
    """Fields every method shares.

    target_modules: module-name suffixes (list) or a regex matched against the full name (str),
    with PEFT's own matcher. exclude_modules: the same, for modules never to adapt.
    modules_to_save: modules trained whole and saved with the adapter (default: LLaVA's
    projector, where the model has one). task_names: the task behind each task id, saved with the
    adapter. base_model_name_or_path: what the adapter was trained on (as in PEFT). fast_path: use the fused kernels where they apply (False forces the reference).
    compute_dtype: "input" runs the adapter matmuls in the input's dtype (bf16 under a bf16 base,
    as torch.autocast and the HF Trainer's bf16 mode do) with float32 parameters, so the optimizer
    state stays float32; "float32" upcasts the input instead (PEFT's default, slower). Gate logits
    follow it; the gate's softmax is float32 either way.
    """

    method: ClassVar[str] = ""
    r: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    exclude_modules: list[str] | str | None = DEFAULT_EXCLUDE_MODULES
    modules_to_save: list[str] | None = field(default_factory=lambda: list(DEFAULT_MODULES_TO_SAVE))
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_names: list[str] | None = None
    fast_path: bool = True
    group_siblings: bool = True
    compute_dtype: str = "input"
    base_model_name_or_path: str | None = None

    # Read by peft's check_target_module_exists.
    target_parameters: ClassVar[None] = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            _fail(self, "r", f"must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or not self.lora_alpha > 0:
            _fail(self, "lora_alpha", f"must be a positive number, got {self.lora_alpha!r}")
        check_field_types(self)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            _fail(self, "lora_dropout", f"must lie in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            _fail(self, "target_modules", "must name at least one module (a list of suffixes or a regex)")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):  # PEFT matches these as regexes
            for pattern in [getattr(self, name)] if isinstance(getattr(self, name), str) else getattr(self, name) or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    _fail(self, name, f"{pattern!r} is not a valid regular expression ({err})")
        if self.compute_dtype not in ("input", "float32"):
            _fail(self, "compute_dtype", f"must be 'input' or 'float32', got {self.compute_dtype!r}")
        if self.task_names is not None:
            if len(set(self.task_names)) != len(self.task_names) or not all(
                isinstance(t, str) and t for t in self.task_names
            ):
                _fail(self, "task_names", f"must be distinct non-empty strings, got {self.task_names!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"method", "asymlora_version"}, key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; valid: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ExpertConfig(AdapterConfig):
    """Fields of the expert methods (LoRA-MoE, AsymLoRA).

    num_experts: N. routing: "task" | "soft" | "topk" | "task_supervised" (see routing.py).
    top_k: experts kept by "topk". granularity: "token" or "instance" (the router sees the mean of
    the sample's non-padding tokens). load_balancing: "switch" (N·Σ f·P, Switch Transformer),
    "mole" (the MLLM-HydraLoRA code's per-sample form) or "none"; applies to soft and topk.
    load_balancing_coef, task_supervision_coef: weights of those losses in the training loss.
    """

    num_experts: int = 3
    routing: str = "task"
    top_k: int = 1
    granularity: str = "token"
    load_balancing: str = "switch"
    load_balancing_coef: float = 0.01
    task_supervision_coef: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_experts, int) or isinstance(self.num_experts, bool) or self.num_experts < 1:
            _fail(self, "num_experts", f"must be an integer >= 1, got {self.num_experts!r}")
        if self.routing not in ROUTINGS:
            _fail(self, "routing", f"must be one of {ROUTINGS}, got {self.routing!r}")
        if self.granularity not in GRANULARITIES:
            _fail(self, "granularity", f"must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.load_balancing not in LOAD_BALANCING:
            _fail(self, "load_balancing", f"must be one of {LOAD_BALANCING}, got {self.load_balancing!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            _fail(self, "top_k", f"must lie in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        for name in ("load_balancing_coef", "task_supervision_coef"):
            if getattr(self, name) < 0:
                _fail(self, name, f"must be >= 0, got {getattr(self, name)!r}")
        if self.task_names is not None and self.routing in ("task", "task_supervised"):
            if len(self.task_names) > self.num_experts:
                _fail(self, "task_names", f"has {len(self.task_names)} tasks but num_experts is {self.num_experts}: "
                      "task routing needs one expert per task")

    @property
    def has_router(self) -> bool:
        return self.routing != "task"
