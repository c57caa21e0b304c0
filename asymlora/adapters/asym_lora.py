"""AsymLoRA (seed 000): one shared A, N task-specific B's, mixed by a gate.

    y = W x + (α / r) · Σ_i g_i(x) · B_i A dropout(x)

A ∈ R^{r×d_in} is shared across experts (common knowledge), B_i ∈ R^{d_out×r} per expert
(conflicting objectives). A is Kaiming-uniform (a = √5) and every B_i zero, as LoRA and both
HydraLoRA codes do, so the adapted model equals the base at step 0. Gate g: routing.py.
With N = 1 (any routing) the layer is exactly LoRA(A, B_1).

Router placement follows the text HydraLoRA code (T): one bias-free ``Linear(d_in, N)`` per
adapted linear, reading the clean input (dropout applies to the adapter path only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..kernels import asym_lora_delta
from .config import ExpertConfig
from .layer import AdapterLayer
from .routing import RoutingContext, expert_weights, hard_route, hard_task_index


@dataclass
class AsymLoraConfig(ExpertConfig):
    """AsymLoRA: defaults from the paper (r = 32, α = 64, N = 3, task routing, LLM frozen)."""

    method = "asymlora"


class AsymLoraLinear(AdapterLayer):
    """shared_a: (r, d_in); expert_b: (N, d_out, r); router: Linear(d_in, N) unless routing="task"."""

    def __init__(self, base_layer: nn.Linear, config: AsymLoraConfig, name: str) -> None:
        super().__init__(base_layer, config, name)
        self.config = config
        self.shared_a = self._new_parameter(config.r, self.in_features)
        self.expert_b = self._new_parameter(config.num_experts, self.out_features, config.r)
        self.router = self._expert_router(config)
        nn.init.kaiming_uniform_(self.shared_a, a=math.sqrt(5))
        nn.init.zeros_(self.expert_b)

    def shared_a_rows(self) -> int:  # generation stacks factors where routing is by task
        return self.config.r if self.config.routing in ("task", "task_supervised") else 0

    def routed_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple | None:
        index = hard_route(x, ctx, self.router, self.config, self.name)
        return None if index is None else (self.shared_a, self.expert_b, None, index)

    def gated_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple:
        return self.shared_a, self.expert_b, expert_weights(x, ctx, self.router, self.config, self.name)

    def delta(self, x: Tensor, ctx: RoutingContext | None) -> Tensor:
        weights = expert_weights(x, ctx, self.router, self.config, self.name)
        index = hard_task_index(ctx, self.config, x.shape[0])
        dtype = self.compute_dtype(x)
        x = self.dropout(x.to(dtype))
        return asym_lora_delta(x, self.shared_a.to(dtype), self.expert_b.to(dtype), weights, self.scaling,
                               self.fast_path, index)

    def task_lora(self, task: int) -> tuple[Tensor, Tensor]:
        return self.shared_a, self.expert_b[task]
