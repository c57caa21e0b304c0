"""What every adapter layer shares: the frozen base linear, scaling, dropout, merge and unmerge."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .routing import RoutingContext


class AdapterLayer(nn.Module):
    """Wraps a frozen ``nn.Linear``: ``y = W x + delta(x)``; subclasses define ``delta``.

    Adapter parameters are kept in float32 (as PEFT does by default) whatever the base dtype; the
    delta is computed there and cast to the base output's dtype.
    """

    def __init__(self, base_layer: nn.Linear, config, name: str) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: only nn.Linear layers can be adapted, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.name = name
        self.scaling = config.scaling
        self.fast_path = config.fast_path
        self.compute_in_input_dtype = config.compute_dtype == "input"
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.merged_task: int | None = None
        self._unmerged_weight: Tensor | None = None

    def _new_parameter(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, device=self.base_layer.weight.device, dtype=torch.float32))

    def _expert_router(self, config) -> nn.Linear | None:
        """The gate ``Linear(d_in, N)`` of an expert layer (bias-free, nn.Linear's Kaiming init, as
        the text HydraLoRA code), or None when routing is by task id."""
        if not config.has_router:
            return None
        return nn.Linear(self.in_features, config.num_experts, bias=False, device=self.base_layer.weight.device)

    def forward(self, x: Tensor, routing: RoutingContext | None = None) -> Tensor:
        result = self.base_layer(x)
        if self.merged_task is not None:
            return result
        return result + self.delta(x, routing).to(result.dtype)

    def delta(self, x: Tensor, ctx: RoutingContext | None) -> Tensor:
        raise NotImplementedError

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the adapter matmuls run in (parameters are cast to it, not stored in it)."""
        return x.dtype if self.compute_in_input_dtype and x.is_floating_point() else torch.float32

    def task_lora(self, task: int) -> tuple[Tensor, Tensor]:
        """The plain LoRA ``(A: (r, d_in), B: (d_out, r))`` this layer is for one task, if it is one."""
        raise TypeError(f"{type(self).__name__} routes per instance from the input: it is no fixed LoRA per task")

    def merge(self, task: int) -> None:
        """Fold ``W + s · B_t A_t`` into the base weight; a CPU copy of W makes unmerge exact."""
        if self.merged_task is not None:
            raise RuntimeError(f"{self.name} is already merged (task {self.merged_task}); call unmerge() first")
        a, b = self.task_lora(task)
        weight = self.base_layer.weight
        self._unmerged_weight = weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            weight.copy_((weight.float() + self.scaling * (b.float() @ a.float())).to(weight.dtype))
        self.merged_task = task

    def unmerge(self) -> None:
        if self.merged_task is None:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._unmerged_weight.to(self.base_layer.weight.device))
        self._unmerged_weight = None
        self.merged_task = None

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the adapter (trainable or not), without the frozen base layer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scaling={self.scaling:g}"
