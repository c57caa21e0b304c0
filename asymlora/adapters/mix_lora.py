"""MixLoRA, Conditional Mixture-of-LoRA (seed 003; VT-NLP/MixLoRA).

A pool of E rank-1 factors per adapted linear, ``factor_a: (E, d_in)`` and ``factor_b: (E, d_out)``.
Per instance, with x̄ the mean of the layer's input over the sample's tokens:

- Independent Factor Selection (IFS): two bias-free routers score the pool from x̄ and each keeps
  the top r: ``idx_a = top_r(R_A x̄)``, ``idx_b = top_r(score_B)``;
- Conditional Factor Selection (CFS, ``conditional=True``) refines B's scores with A's choice:
  ``score_B = softmax(R_B x̄) + cfs_weight · softmax(Σ_j softmax_E(c_j))`` where ``c_j`` comes from
  ``Linear(r·d_in, E)`` sliced per rank position j and the j-th selected a. ``cfs_form="code"``
  reproduces the official einsum, ``c_j = (Σ_d a_{sel_j,d}) · (Σ_f W_{j,:,f})``; ``"dot"`` is the
  dot product ``c_j = W_j a_{sel_j}`` the paper's wording suggests. Without CFS, ``score_B = R_B x̄``;
- the instance's update: ``Δy = (α / r) · Σ_j c^B_j c^A_j · b_{idx_b[j]} (a_{idx_a[j]} · x)``, factors
  paired by rank position j (``pairing="rank"``, the code) or with both index lists sorted
  ascending first (``pairing="sorted"``: with E = r every factor is selected and the layer is
  exactly LoRA(A = factor_a, B = factor_bᵀ)).

``factor_weighting="none"`` follows the official script (``used_scored_weight False``): c = 1, so
the hard top-r passes no gradient to the routers, which stay random projections of x̄; they are
frozen here (not counted as trainable) and only the factors train. ``"straight_through"``
multiplies each factor by ``p / stopgrad(p)`` (value 1, gradient of log p) and ``"softmax"`` by
``r ·`` the renormalised selected scores, so the routers learn.

Init as the code: every a_e Kaiming-uniform (a = √5), every b_e zero. x̄ excludes padding unless
``pool_padding=True`` (the code's plain mean over all positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import mix_lora_delta
from .config import AdapterConfig, _fail
from .layer import AdapterLayer
from .routing import RoutingContext, gate_entropy, pooled_input

FACTOR_WEIGHTINGS = ("none", "straight_through", "softmax")
CFS_FORMS = ("code", "dot")
PAIRINGS = ("rank", "sorted")


@dataclass
class MixLoraConfig(AdapterConfig):
    """MixLoRA; defaults from ``finetune_mixlora.sh``: E = 32, r = 4, α = 2E = 64, CFS on."""

    method = "mixlora"
    r: int = 4
    num_factors: int = 32
    lora_alpha: float = 64.0
    conditional: bool = True
    cfs_form: str = "code"
    cfs_weight: float = 1.0
    factor_weighting: str = "none"
    pairing: str = "rank"
    pool_padding: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_factors, int) or self.num_factors < self.r:
            _fail(self, "num_factors", f"(E) must be an integer >= r={self.r}, got {self.num_factors!r}")
        if self.factor_weighting not in FACTOR_WEIGHTINGS:
            _fail(self, "factor_weighting", f"must be one of {FACTOR_WEIGHTINGS}, got {self.factor_weighting!r}")
        if self.cfs_form not in CFS_FORMS:
            _fail(self, "cfs_form", f"must be one of {CFS_FORMS}, got {self.cfs_form!r}")
        if self.pairing not in PAIRINGS:
            _fail(self, "pairing", f"must be one of {PAIRINGS}, got {self.pairing!r}")


class MixLoraLinear(AdapterLayer):
    """factor_a: (E, d_in); factor_b: (E, d_out); router_a, router_b: Linear(d_in, E);
    cfs_router: Linear(r·d_in, E) when conditional."""

    def __init__(self, base_layer: nn.Linear, config: MixLoraConfig, name: str) -> None:
        super().__init__(base_layer, config, name)
        self.config = config
        e, r, device = config.num_factors, config.r, base_layer.weight.device
        self.factor_a = self._new_parameter(e, self.in_features)
        self.factor_b = self._new_parameter(e, self.out_features)
        self.router_a = nn.Linear(self.in_features, e, bias=False, device=device)
        self.router_b = nn.Linear(self.in_features, e, bias=False, device=device)
        self.cfs_router = nn.Linear(r * self.in_features, e, bias=False, device=device) if config.conditional else None
        nn.init.kaiming_uniform_(self.factor_a, a=math.sqrt(5))
        nn.init.zeros_(self.factor_b)
        if config.factor_weighting == "none":
            for router in (self.router_a, self.router_b, self.cfs_router):
                if router is not None:
                    router.requires_grad_(False)

    def select(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Indices ``(batch, r)`` and coefficients ``(batch, r)`` for A and B, and both score tensors."""
        r = self.config.r
        pooled = pooled.to(self.router_a.weight.dtype)
        scores_a = self.router_a(pooled)
        index_a = scores_a.topk(r, dim=-1).indices
        if self.config.pairing == "sorted":
            index_a = index_a.sort(dim=-1).values
        logits_b = self.router_b(pooled)
        if self.cfs_router is not None:
            scores_b = torch.softmax(logits_b, -1) + self.config.cfs_weight * self.conditional_scores(index_a)
        else:
            scores_b = logits_b
        index_b = scores_b.topk(r, dim=-1).indices
        if self.config.pairing == "sorted":
            index_b = index_b.sort(dim=-1).values
        return index_a, index_b, self._coefficients(scores_a, index_a), self._coefficients(scores_b, index_b), scores_a, scores_b

    def conditional_scores(self, index_a: Tensor) -> Tensor:
        """``softmax(Σ_j softmax_E(c_j))``: (batch, E), from the selected A factors (CFS)."""
        e, r, d = self.config.num_factors, self.config.r, self.in_features
        a_sel = self.factor_a[index_a]  # (batch, r, d_in)
        w = self.cfs_router.weight.view(e, r, d)  # slice j of the Linear(r·d_in, E) input
        if self.config.cfs_form == "code":
            c = a_sel.sum(-1).unsqueeze(-1) * w.sum(-1).T.unsqueeze(0)  # (batch, r, E)
        else:
            c = torch.einsum("bjd,ejd->bje", a_sel, w)
        return torch.softmax(torch.softmax(c, dim=-1).sum(1), dim=-1)

    def _coefficients(self, scores: Tensor, index: Tensor) -> Tensor:
        mode = self.config.factor_weighting
        if mode == "none":
            return torch.ones(index.shape, device=index.device, dtype=self.factor_a.dtype)
        if mode == "straight_through":
            p = torch.softmax(scores, -1).gather(-1, index)
            return p / p.detach()
        kept = torch.softmax(scores.gather(-1, index), -1)
        return kept * self.config.r

    def _route(self, x: Tensor, ctx: RoutingContext | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pooled = pooled_input(x, ctx, self.name, include_padding=self.config.pool_padding)
        index_a, index_b, coef_a, coef_b, scores_a, scores_b = self.select(pooled)
        if ctx is not None:
            self._record(ctx, index_a, index_b, scores_a, scores_b)
        return index_a, index_b, coef_a, coef_b

    def routed_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple:
        """The selected factors, paired by rank position: the pools and each instance's indices
        (the op gathers them), or, when coefficients weight them, the instance's A ``(batch, r,
        d_in)`` and B ``(batch, d_out, r)`` gathered here so the coefficients get gradients."""
        index_a, index_b, coef_a, coef_b = self._route(x, ctx)
        if self.config.factor_weighting == "none":
            return self.factor_a, self.factor_b, index_a, index_b
        a = self.factor_a[index_a] * coef_a.unsqueeze(-1).to(self.factor_a.dtype)
        b = self.factor_b[index_b] * coef_b.unsqueeze(-1).to(self.factor_b.dtype)
        return a, b.transpose(1, 2), None, None

    def delta(self, x: Tensor, ctx: RoutingContext | None) -> Tensor:
        index_a, index_b, coef_a, coef_b = self._route(x, ctx)
        dtype = self.compute_dtype(x)
        x = self.dropout(x.to(dtype))
        return mix_lora_delta(x, self.factor_a.to(dtype), self.factor_b.to(dtype), index_a, index_b, coef_a, coef_b,
                              self.scaling, self.fast_path)

    def _record(self, ctx: RoutingContext, index_a: Tensor, index_b: Tensor, scores_a: Tensor, scores_b: Tensor) -> None:
        if not ctx.recording or not (ctx.collect_stats or ctx.collect_selections):
            return
        e = self.config.num_factors
        with torch.no_grad():
            for side, index, scores in (("A", index_a, scores_a), ("B", index_b, scores_b)):
                chosen = F.one_hot(index, e).sum(1).float().cpu()  # (batch, E) multi-hot
                key = f"{self.name}:{side}"
                if ctx.collect_stats:
                    probs = torch.softmax(scores.float(), -1).unsqueeze(1)
                    ctx.stats[key] = {"usage": chosen.mean(0), "entropy": gate_entropy(probs, probs.new_ones(probs.shape[:2])).cpu()}
                if ctx.collect_selections:
                    ctx.selections[key] = chosen
