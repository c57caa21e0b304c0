"""Put adapters into an unmodified transformers model, and everything PEFT users expect of it.

- Target linears are found with PEFT's own matcher (``check_target_module_exists``), so
  ``target_modules`` / ``exclude_modules`` / ``layers_to_transform`` mean what they mean in PEFT.
- Per-sample inputs (``task_ids``, the attention mask for instance pooling) reach the layers one
  way only, as in PEFT's Poly (which uses a forward pre-hook per layer): the wrapper's current
  :class:`RoutingContext` sits in one :class:`RoutingSource` that every adapter layer holds (no
  hook: under torch.compile each hook's guards were evaluated before every call). The context is
  set by the wrapper's ``forward`` / ``generate`` and stays until the next call, so
  gradient-checkpointing recomputation in the backward pass routes exactly as the forward did.
- Files: ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT-style keys
  (``base_model.model.<module>.<tensor>``), written atomically; adapters load from safetensors only
  (never a pickle), and the file's header (names, shapes, dtypes) is checked against what the config
  and the base model imply before any adapter tensor is allocated, so a hostile or mismatched folder
  is refused with a ValueError / ConfigError / FileNotFoundError that names it.
- PEFT's ``PeftType`` is a closed enum, so these methods are not registered with PEFT; plain
  LoRA is PEFT's own (see :class:`PeftLoraModel`) and ``export_lora`` writes PEFT LoRA folders.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .asym_lora import AsymLoraConfig, AsymLoraLinear
from .config import DEFAULT_MODULES_TO_SAVE, AdapterConfig, ConfigError
from .layer import GENERATION_PENDING, AdapterLayer, link_frozen_rows
from .lora_moe import LoraMoeConfig, LoraMoeLinear
from .mix_lora import MixLoraConfig, MixLoraLinear
from .routing import RoutingContext, RoutingSource

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

METHODS: dict[str, tuple[type[AdapterConfig], type[AdapterLayer]]] = {
    AsymLoraConfig.method: (AsymLoraConfig, AsymLoraLinear),
    LoraMoeConfig.method: (LoraMoeConfig, LoraMoeLinear),
    MixLoraConfig.method: (MixLoraConfig, MixLoraLinear),
}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: never a half file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _resolve_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules trained whole. Defaults that the model lacks are dropped silently
    (a text-only model has no projector); names the user gave must exist."""
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules()]
    found = []
    for wanted in config.modules_to_save:
        hits = [n for n in names if n == wanted or n.endswith("." + wanted)]
        if not hits and config.modules_to_save != DEFAULT_MODULES_TO_SAVE:
            raise ConfigError(f"{type(config).__name__}.modules_to_save: no module of {type(model).__name__} is named {wanted!r}")
        found.extend(hits)
    return sorted(set(found))


def find_target_linears(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the linear layers the config adapts (PEFT's matching rules)."""
    matched = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            raise ValueError(f"{name} is already adapted: get_model() was called twice on this model")
        if isinstance(module, nn.Linear) and bool(check_target_module_exists(config, name)):
            matched.append(name)
    if not matched:
        raise ConfigError(
            f"{type(config).__name__}.target_modules={config.target_modules!r} matches no nn.Linear of "
            f"{type(model).__name__} (exclude_modules={config.exclude_modules!r}); linear layers there "
            f"include {[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]}"
        )
    return matched


def _task_ids_tensor(task_ids: Any, task_names: Sequence[str] | None) -> Tensor | None:
    """Accept a LongTensor, a list of ints, or a list of task names."""
    if task_ids is None or isinstance(task_ids, Tensor):
        return task_ids
    ids = list(task_ids)
    if ids and all(isinstance(t, str) for t in ids):
        if not task_names:
            raise ValueError("task_ids were given as names but the adapter has no task_names")
        unknown = [t for t in ids if t not in task_names]
        if unknown:
            raise ValueError(f"unknown task name(s) {unknown} in task_ids; known tasks: {list(task_names)}")
        ids = [list(task_names).index(t) for t in ids]
    return torch.as_tensor(ids, dtype=torch.long)


# Linears of one module that read the same input in the models transformers ships: attention's q,
# k and v (Llama, Mistral, Qwen, Gemma, CLIP, SigLIP), a gated MLP's gate and up, BERT-style
# attention. A group that turns out not to share its input leaves itself (AdapterLayer._leave_group).
SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def link_siblings(layers: dict[str, AdapterLayer]) -> None:
    """Declare the adapted linears of each :data:`SIBLING_GROUPS` entry in one module siblings."""
    children: dict[str, dict[str, AdapterLayer]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        children.setdefault(parent, {})[child] = layer
    for named in children.values():
        for group in SIBLING_GROUPS:
            members = [named[c] for c in group if c in named]
            if len(members) > 1 and len({m.in_features for m in members}) == 1:
                for m in members:
                    m.siblings = tuple(o for o in members if o is not m)


class AdapterModel(nn.Module):
    """A transformers model with AsymLoRA / LoRA-MoE / MixLoRA layers in place of its target linears.

    ``forward`` and ``generate`` take ``task_ids: (batch,)`` besides the base model's arguments.
    When ``labels`` are given, ``outputs.loss`` is the language-modelling loss plus
    :meth:`auxiliary_loss` (the one place router losses enter training), and the parts are kept in
    ``last_loss_parts`` for logging. Unknown attributes are looked up on the base model.
    """

    def __init__(self, base_model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        config.validate()
        _check_fits_in_memory(base_model, config)
        self.base_model = base_model
        self.config = config
        self._routing_source = RoutingSource(RoutingContext())
        self._generating = False
        self._loss_parts: dict[str, Tensor] = {}
        layer_cls = METHODS[config.method][1]
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.modules_to_save = _resolve_modules_to_save(base_model, config)
        targets = find_target_linears(base_model, config)
        self.adapter_layers: dict[str, AdapterLayer] = {}
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            layer = layer_cls(getattr(parent, child), config, name)
            layer.routing_source = self._routing_source
            setattr(parent, child, layer)
            self.adapter_layers[name] = layer
        if config.fast_path and config.group_siblings:
            link_siblings(self.adapter_layers)
        if config.fast_path and config.compute_dtype == "input":
            self.link_frozen_rows()
        for name in self.modules_to_save:
            base_model.get_submodule(name).requires_grad_(True)

    def link_frozen_rows(self) -> None:
        """Give the first adapted linear of each group (q_proj for q, k, v; gate_proj; o_proj and
        down_proj alone) whose A is one for all samples in ``generate`` (AsymLoRA, task routing)
        room for the group's stacked A below its frozen weight, padded to 64 rows: each call's prompt
        writes it there and every decode step's frozen GEMM computes ``x Aᵀ`` with the base output
        (kernels.lowrank_linear_prepared's ``frozen_rows``: one kernel fewer a group and token).
        Those base weights become views of their first rows: same values, same Parameters, same
        state dict. Done at construction and kept through ``.to()`` and ``load_state_dict``; a
        weight replaced otherwise lets its rows go (call this again to relink)."""
        for layer in self.adapter_layers.values():
            group = (layer, *layer.siblings)
            if any(m._frozen_rows is not None for m in layer.siblings):
                continue  # a sibling before it in the module leads the group
            if all(m.shared_a_rows() > 0 for m in group):
                link_frozen_rows(layer, -(-sum(m.shared_a_rows() for m in group) // 64) * 64)

    # ----------------------------------------------------------------- routing inputs
    @property
    def _context(self) -> RoutingContext:
        return self._routing_source.context

    @property
    def task_names(self) -> list[str] | None:
        return self.config.task_names

    def _check_task_ids(self, task_ids: Tensor | None, batch: int | None) -> None:
        routing = getattr(self.config, "routing", None)
        merged = self.merged_task
        if merged is not None:
            if task_ids is not None and bool((task_ids != merged).any()):
                raise ValueError(f"the adapter is merged for task {merged}; got task_ids {task_ids.tolist()}: unmerge() first")
            return
        if routing == "task" and task_ids is None:
            raise ValueError(f"{type(self.config).__name__}.routing='task' needs task_ids: call model(..., task_ids=...)")
        if task_ids is None:
            return
        if task_ids.dim() != 1:
            raise ValueError(f"task_ids must be 1-D (batch,), got shape {tuple(task_ids.shape)}")
        if batch is not None and task_ids.shape[0] != batch:
            raise ValueError(f"task_ids has {task_ids.shape[0]} entries but the batch has {batch} samples")
        n = getattr(self.config, "num_experts", None)
        # Values are checked where reading them is free: ids given on the host (a list, names, a CPU
        # tensor). Ids already on an accelerator are not read back: that would stall the host on the
        # GPU every step (it could no longer queue the next forward while the backward runs); an
        # id out of range there fails in the op's index lookup, as an embedding lookup does.
        if n is not None and routing in ("task", "task_supervised") and task_ids.numel() and task_ids.device.type == "cpu":
            if int(task_ids.min()) < 0 or int(task_ids.max()) >= n:
                raise ValueError(f"task_ids must lie in [0, num_experts={n}); got {task_ids.tolist()}")

    def _set_context(self, task_ids: Any, kwargs: dict, generating: bool) -> RoutingContext:
        task_ids = _task_ids_tensor(task_ids, self.config.task_names)
        ids = kwargs.get("input_ids")
        inputs = ids if isinstance(ids, Tensor) else kwargs.get("inputs_embeds")
        batch = inputs.shape[0] if isinstance(inputs, Tensor) else None
        self._check_task_ids(task_ids, batch)
        if task_ids is not None and isinstance(inputs, Tensor):
            task_ids = task_ids.to(inputs.device)  # checked on the host first, moved once per forward
        old = self._context
        mask, labels = kwargs.get("attention_mask"), kwargs.get("labels")
        pool_mask = None
        if isinstance(labels, Tensor) and isinstance(ids, Tensor) and labels.shape == ids.shape:
            pool_mask = (labels == -100) & (mask.bool() if isinstance(mask, Tensor) else True)
        if generating or self._generating:
            self._set_generation(generating)
        self._routing_source.context = RoutingContext(
            task_ids=task_ids,
            attention_mask=mask,
            pool_mask=pool_mask,
            pooled_cache={} if generating else None,
            collect_stats=old.collect_stats,
            collect_selections=old.collect_selections,
        )
        return self._context

    def _set_generation(self, active: bool) -> None:
        """Start (or end) a generate call's state on every layer: each group's factors are stacked
        at the call's prompt (:func:`asymlora.adapters.layer._generation_forward`)."""
        for layer in self.adapter_layers.values():
            layer._generation = GENERATION_PENDING if active else None
            layer._handed = None
        self._generating = active

    def release_generation_buffers(self) -> None:
        """Free the buffers that hold each group's stacked factors between ``generate`` calls
        (kept, as transformers keeps a static KV cache, so a compiled decode step reads the same
        addresses at every call; the next call allocates them again)."""
        for layer in self.adapter_layers.values():
            layer._generation_buffers = None
            if isinstance(layer._generation, tuple):
                layer._generation = GENERATION_PENDING

    @contextmanager
    def collect_routing(self, stats: bool = True, selections: bool = False) -> Iterator[None]:
        """Within this block, each forward records per-layer routing statistics / selections
        (read them from :attr:`routing_context` after the forward)."""
        self._context.collect_stats, self._context.collect_selections = stats, selections
        try:
            yield
        finally:
            self._context.collect_stats = self._context.collect_selections = False

    @property
    def routing_context(self) -> RoutingContext:
        return self._context

    # ----------------------------------------------------------------- forward / generate
    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any):
        ctx = self._set_context(task_ids, kwargs, generating=False)
        try:
            outputs = self.base_model(*args, **kwargs)
        finally:
            ctx.recording = False
        aux = self.auxiliary_loss()
        if getattr(outputs, "loss", None) is not None:
            # Kept as tensors: reading them back here would stall the GPU before every backward.
            self._loss_parts = {"lm_loss": outputs.loss.detach(), **{k: v.detach() for k, v in self._aux_parts().items()}}
            if aux is not None:
                outputs.loss = outputs.loss + aux
        return outputs

    @torch.no_grad()
    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any):
        ctx = self._set_context(task_ids, kwargs, generating=True)
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            ctx.recording = False
            self._set_generation(False)

    @property
    def last_loss_parts(self) -> dict[str, float]:
        """The last training forward's loss and its auxiliary parts, for logging."""
        return {k: float(v) for k, v in self._loss_parts.items()}

    def _aux_parts(self) -> dict[str, Tensor]:
        parts = {}
        for kind, values in self._context.aux_losses.items():
            parts[kind] = torch.stack([v.float() for v in values]).mean()
        return parts

    def auxiliary_loss(self) -> Tensor | None:
        """The router losses of the last forward, as they enter the training loss:

            load_balancing_coef · mean over layers of the load-balancing loss (soft / topk)
          + task_supervision_coef · mean over layers of the gate's cross-entropy to the task id
            (task_supervised)

        None when the method has none (task routing, MixLoRA).
        """
        parts = self._aux_parts()
        if not parts:
            return None
        coefs = {
            "load_balancing": getattr(self.config, "load_balancing_coef", 0.0),
            "task_supervision": getattr(self.config, "task_supervision_coef", 0.0),
        }
        return sum(coefs[k] * v for k, v in parts.items())

    # ----------------------------------------------------------------- parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """PEFT-style keys: adapter tensors of every layer, then the modules_to_save."""
        state = {}
        for name, layer in self.adapter_layers.items():
            for key, value in layer.adapter_state_dict().items():
                state[f"{KEY_PREFIX}{name}.{key}"] = value
        for name in self.modules_to_save:
            for key, value in self.base_model.get_submodule(name).state_dict().items():
                state[f"{KEY_PREFIX}{name}.{key}"] = value
        return state

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_model"), name)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each atomically).

        ``state_dict``: the tensors to write instead of :meth:`adapter_state_dict` (the same keys),
        e.g. gathered whole from FSDP shards.
        """
        if self.merged_task is not None:
            raise RuntimeError("save_pretrained on a merged model would save merged base weights: unmerge() first")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.adapter_state_dict() if state_dict is None else state_dict
        atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
        data = {"asymlora_version": _version(), **self.config.to_dict()}
        atomic_write_bytes(path / CONFIG_NAME, (json.dumps(data, indent=2) + "\n").encode())

    def load_adapter_weights(self, path: Path) -> None:
        file = weights_file(path)
        expected = self.adapter_state_dict()
        check_weights_header(file, {k: tuple(v.shape) for k, v in expected.items()})
        try:
            loaded = load_file(str(file))
        except Exception as err:  # safetensors raises several types for corrupt files
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(loaded[key])

    # ----------------------------------------------------------------- merge / export
    @property
    def merged_task(self) -> int | None:
        layer = next(iter(self.adapter_layers.values()))
        return layer.merged_task

    def _task_index(self, task: int | str) -> int:
        config = self.config
        if not isinstance(config, (AsymLoraConfig, LoraMoeConfig)):
            raise TypeError(
                f"{type(config).__name__} selects factors per instance from the input, so no single weight "
                "update exists to merge or export; only task-routed AsymLoRA and LoRA-MoE can be merged"
            )
        if config.routing not in ("task", "task_supervised"):
            raise TypeError(
                f"routing={config.routing!r} mixes experts by a gate that depends on each input, so no "
                "single weight update exists to merge or export; only routing='task' or 'task_supervised' "
                "(with a task given) can be merged"
            )
        if isinstance(task, str):
            if not config.task_names or task not in config.task_names:
                raise ValueError(f"unknown task {task!r}; known tasks: {config.task_names}")
            task = config.task_names.index(task)
        if not 0 <= int(task) < config.num_experts:
            raise ValueError(f"task must lie in [0, num_experts={config.num_experts}), got {task}")
        return int(task)

    def merge(self, task: int | str) -> None:
        """Fold ``W + s · B_t A`` (LoRA-MoE: ``B_t A_t``) of one task into every adapted weight."""
        index = self._task_index(task)
        for layer in self.adapter_layers.values():
            layer.merge(index)

    def unmerge(self) -> None:
        """Restore the base weights exactly (from the copy merge kept)."""
        for layer in self.adapter_layers.values():
            layer.unmerge()

    def export_lora(self, task: int | str, path: str | os.PathLike) -> None:
        """Write the task's adapter as a standard PEFT LoRA folder (loads with PeftModel.from_pretrained)."""
        index = self._task_index(task)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, layer in self.adapter_layers.items():
            a, b = layer.task_lora(index)
            tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a
            tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b
        for name in self.modules_to_save:
            for key, value in self.base_model.get_submodule(name).state_dict().items():
                tensors[f"{KEY_PREFIX}{name}.{key}"] = value
        atomic_save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.config.r,
            "lora_alpha": self.config.lora_alpha,
            "lora_dropout": self.config.lora_dropout,
            "bias": "none",
            # Exact names, so PEFT adapts what this adapter adapted and nothing else.
            "target_modules": "^(" + "|".join(re.escape(n) for n in self.adapter_layers) + ")$",
            "modules_to_save": self.modules_to_save or None,
            "base_model_name_or_path": getattr(getattr(self.base_model, "config", None), "_name_or_path", None),
        }
        atomic_write_bytes(path / CONFIG_NAME, (json.dumps(peft_config, indent=2) + "\n").encode())


class PeftLoraModel(nn.Module):
    """Plain LoRA, the baseline, is PEFT's own: this thin shell gives it the same verbs as ours
    (``task_ids`` accepted and ignored, no auxiliary loss, PEFT's file format)."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.peft_model = peft_model
        self._loss_parts: dict[str, Tensor] = {}

    @property
    def task_names(self) -> list[str] | None:
        return getattr(self.peft_model, "asymlora_task_names", None)

    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any):
        outputs = self.peft_model(*args, **kwargs)
        if getattr(outputs, "loss", None) is not None:
            self._loss_parts = {"lm_loss": outputs.loss.detach()}
        return outputs

    @property
    def last_loss_parts(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._loss_parts.items()}

    @torch.no_grad()
    def generate(self, *args: Any, task_ids: Any = None, **kwargs: Any):
        return self.peft_model.generate(*args, **kwargs)

    def auxiliary_loss(self) -> None:
        return None

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> None:
        """PEFT's own; ``state_dict`` (the PEFT model's parameter names) replaces the live tensors."""
        self.peft_model.save_pretrained(str(save_directory), safe_serialization=True, state_dict=state_dict)
        if self.task_names:
            atomic_write_bytes(Path(save_directory) / "task_names.json", json.dumps(self.task_names).encode())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("peft_model"), name)


def get_model(base_model: nn.Module, config: Any) -> AdapterModel | PeftLoraModel:
    """Wrap ``base_model`` with the adapter ``config`` describes (ours, or PEFT's ``LoraConfig``).

    The base model's weights are frozen; only the adapter and the modules_to_save train.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(config, LoraConfig):
        task_names = getattr(config, "_asymlora_task_names", None)
        _check_fits_in_memory(base_model, config)
        try:
            peft_model = get_peft_model(base_model, config)
        except ValueError as err:  # PEFT's config checks, e.g. target_modules that match nothing
            raise ConfigError(f"LoraConfig: {err}") from None
        peft_model.asymlora_task_names = task_names
        return PeftLoraModel(peft_model)
    if not isinstance(config, AdapterConfig) or config.method not in METHODS:
        raise TypeError(f"config must be an AsymLoraConfig, LoraMoeConfig, MixLoraConfig or peft.LoraConfig, got {type(config).__name__}")
    return AdapterModel(base_model, config)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not an adapter folder")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{file} is not valid JSON: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def weights_file(path: str | os.PathLike) -> Path:
    """``path/adapter_model.safetensors``; FileNotFoundError if absent (a pickle beside it is never read)."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        others = sorted(p.name for p in Path(path).glob("adapter_model.*"))
        raise FileNotFoundError(
            f"{file} not found" + (f"; found {others}: adapters load from safetensors only" if others else "")
        )
    return file


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` from a safetensors file's header, without reading its tensors."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for corrupt headers
        raise ValueError(f"{file} is not a readable safetensors file: {type(err).__name__}: {err}") from None


def check_weights_header(file: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a weights file whose tensor names, shapes or dtypes differ from ``expected``."""
    header = safetensors_header(file)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    shapes = [f"{k}: file {header[k][0]} vs model {shape}" for k, shape in expected.items()
              if k in header and header[k][0] != tuple(shape)]
    dtypes = sorted({f"{k}: {header[k][1]}" for k in expected if k in header and header[k][1] not in FLOAT_DTYPES})
    if missing or unexpected or shapes or dtypes:
        raise ValueError(
            f"{file} does not fit this model and adapter_config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}"
            + (f", not floating point {dtypes[:5]}" if dtypes else "")
        )


def _adapter_layer_shapes(base_model: nn.Module, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every adapter-layer tensor, from the layers built on the meta device (nothing is
    allocated, whatever sizes the config asks for)."""
    layer_cls = METHODS[config.method][1]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in find_target_linears(base_model, config):
        linear = base_model.get_submodule(name)
        meta = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        for key, value in layer_cls(meta, config, name).adapter_state_dict().items():
            shapes[f"{KEY_PREFIX}{name}.{key}"] = tuple(value.shape)
    return shapes


def _check_fits_in_memory(base_model: nn.Module, config: Any) -> None:
    """Refuse, before allocating, an adapter on CPU larger than the machine's memory (a typo'd ``r``
    would otherwise be allocated lazily and the process killed when it is initialised)."""
    device = next(iter(base_model.parameters()), torch.empty(0)).device
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if device.type != "cpu" or memory <= 0:
        return
    if isinstance(config, AdapterConfig):
        numel = sum(math.prod(shape) for shape in _adapter_layer_shapes(base_model, config).values())
    else:  # PEFT LoRA: A (r x in) and B (out x r) per matched linear
        numel = sum(config.r * (m.in_features + m.out_features) for name, m in base_model.named_modules()
                    if isinstance(m, nn.Linear) and check_target_module_exists(config, name))
    if numel * 4 > memory:
        raise ConfigError(
            f"{type(config).__name__}: the adapter would hold {numel:,d} float32 parameters ({numel * 4 / 2**30:.0f} GiB), "
            f"more than this machine's {memory / 2**30:.0f} GiB of memory; check r, num_experts / num_factors"
        )


def expected_adapter_shapes(base_model: nn.Module, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor ``AdapterModel(base_model, config)`` would save (adapter layers on
    the meta device, then the modules_to_save)."""
    shapes = _adapter_layer_shapes(base_model, config)
    for name in _resolve_modules_to_save(base_model, config):
        for key, value in base_model.get_submodule(name).state_dict().items():
            shapes[f"{KEY_PREFIX}{name}.{key}"] = tuple(value.shape)
    return shapes


def _load_peft_lora(base_model: nn.Module, path: Path, data: dict[str, Any], is_trainable: bool) -> "PeftLoraModel":
    """PEFT's own loader, after checking the file's LoRA ranks against the config's ``r`` (so a
    hostile ``r`` cannot make PEFT allocate before the shapes are compared); PEFT's errors on a
    config or weights that do not fit become one ValueError naming the folder."""
    from peft import PeftModel

    file = weights_file(path)
    r = data.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"{path / CONFIG_NAME}: field 'r' must be a positive integer, got {r!r}")
    if not data.get("rank_pattern"):
        wrong = [f"{k}: {shape}" for k, (shape, _) in safetensors_header(file).items()
                 if (k.endswith("lora_A.weight") and shape[:1] != (r,)) or (k.endswith("lora_B.weight") and shape[1:] != (r,))]
        if wrong:
            raise ValueError(f"{file}: LoRA tensors whose rank is not r={r} of {path / CONFIG_NAME}: {wrong[:5]}")
    try:
        model = PeftModel.from_pretrained(base_model, str(path), is_trainable=is_trainable)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        raise ValueError(f"{path}: not a PEFT LoRA adapter that fits this model: {type(err).__name__}: {err}") from None
    wrapper = PeftLoraModel(model)
    names_file = path / "task_names.json"
    if names_file.is_file():
        try:
            names = json.loads(names_file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:
            raise ValueError(f"{names_file} is not valid JSON: {err}") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{names_file} must hold a JSON list of task names, got {names!r:.200}")
        model.asymlora_task_names = names
    return wrapper


def config_from_dict(data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
    method = data.get("method")
    if method not in METHODS:
        raise ConfigError(f"{source}: field 'method' must be one of {sorted(METHODS)}, got {method!r}")
    try:
        return METHODS[method][0].from_dict(data, source)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ConfigError as err:
        if str(err).startswith(source):
            raise
        raise ConfigError(f"{source}: {err}") from None


def from_pretrained(base_model: nn.Module, path: str | os.PathLike, is_trainable: bool = False) -> AdapterModel | PeftLoraModel:
    """Load an adapter folder written by ``save_pretrained`` (ours or PEFT LoRA) onto ``base_model``."""
    data = read_adapter_config(path)
    source = str(Path(path) / CONFIG_NAME)
    if data.get("peft_type") == "LORA":
        return _load_peft_lora(base_model, Path(path), data, is_trainable)
    config = config_from_dict(data, source)
    check_weights_header(weights_file(path), expected_adapter_shapes(base_model, config))
    model = AdapterModel(base_model, config)
    model.load_adapter_weights(Path(path))
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _version() -> str:
    from .. import __version__

    return __version__
