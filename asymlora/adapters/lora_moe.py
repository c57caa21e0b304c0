"""LoRA-MoE (LLaVA-MoLE, the seed's baseline): N full LoRA experts mixed by a gate.

    y = W x + (α / r) · Σ_i g_i(x) · B_i A_i dropout(x)

Each A_i Kaiming-uniform (a = √5), each B_i zero. At equal r and N it has N·r·d_in adapter
parameters on the A side where AsymLoRA has r·d_in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from ..kernels import lora_moe_delta
from .config import ExpertConfig
from .layer import AdapterLayer
from .routing import RoutingContext, expert_weights, hard_route, hard_task_index


@dataclass
class LoraMoeConfig(ExpertConfig):
    """LoRA-MoE with the same fields and defaults as AsymLoraConfig."""

    method = "lora_moe"


class LoraMoeLinear(AdapterLayer):
    """expert_a: (N, r, d_in); expert_b: (N, d_out, r); router: Linear(d_in, N) unless routing="task"."""

    def __init__(self, base_layer: nn.Linear, config: LoraMoeConfig, name: str) -> None:
        super().__init__(base_layer, config, name)
        self.config = config
        self.expert_a = self._new_parameter(config.num_experts, config.r, self.in_features)
        self.expert_b = self._new_parameter(config.num_experts, self.out_features, config.r)
        self.router = self._expert_router(config)
        for a in self.expert_a.data:  # each expert initialised as its own LoRA A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.expert_b)

    def routed_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple | None:
        index = hard_route(x, ctx, self.router, self.config, self.name)
        return None if index is None else (self.expert_a, self.expert_b, index, index)

    def gated_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple:
        return self.expert_a, self.expert_b, expert_weights(x, ctx, self.router, self.config, self.name)

    def delta(self, x: Tensor, ctx: RoutingContext | None) -> Tensor:
        weights = expert_weights(x, ctx, self.router, self.config, self.name)
        index = hard_task_index(ctx, self.config, x.shape[0])
        dtype = self.compute_dtype(x)
        x = self.dropout(x.to(dtype))
        return lora_moe_delta(x, self.expert_a.to(dtype), self.expert_b.to(dtype), weights, self.scaling,
                              self.fast_path, index)

    def task_lora(self, task: int) -> tuple[Tensor, Tensor]:
        return self.expert_a[task], self.expert_b[task]
