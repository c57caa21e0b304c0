"""Routing as plain functions of tensors: gates, pooling and auxiliary losses.

Layers never implement routing themselves: they call :func:`expert_weights` (expert methods) or
the pooling helpers here (MixLoRA), and these record auxiliary losses and statistics into the
:class:`RoutingContext` of the current forward. A new gate is one function here, not a new layer.

Shapes: ``x: (batch, seq, d_in)``; gate weights ``(batch, seq, N)`` for token routing and
``(batch, 1, N)`` for instance routing (broadcast over the sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

ROUTINGS = ("task", "soft", "topk", "task_supervised")
GRANULARITIES = ("token", "instance")
LOAD_BALANCING = ("switch", "mole", "none")


class RoutingSource:
    """Where an AdapterModel's layers find the current forward's :class:`RoutingContext`: one
    object shared by all of them, its ``context`` replaced at every forward. (A forward pre-hook per
    layer did this before; under torch.compile each hook added guards that are evaluated before
    every compiled call.)"""

    __slots__ = ("context",)

    def __init__(self, context: "RoutingContext | None" = None) -> None:
        self.context = context


@dataclass
class RoutingContext:
    """Per-forward inputs and outputs of routing, read by every adapter layer from the model's
    :class:`RoutingSource`.

    task_ids: (batch,) long, or None. attention_mask: (batch, seq) of the *input* sequence, used
    for instance pooling and to keep padding out of losses and statistics.
    pooled_cache: set during ``generate``, filled by the prompt's pass (the prefill step) and read
    by every generated token: each layer's pooled input, so instance routing is decided once on
    the prompt and the decode steps (which see one token) route exactly as the prompt did. (Each
    group's stacked factors for the call live on its layers: ``AdapterLayer._generation``.)
    pool_mask: (batch, seq), the positions instance routing averages: in training the prompt
    only (attention mask and labels == -100), so the router never sees the answer it will not
    have at inference; None means the attention mask.
    handover: outputs a layer computed for its siblings (q for k and v), by the sibling's name, as
    ``(input, output)``; a sibling takes its own when called on that very input. They live as long
    as the forward: a forward that raises between q and k leaves nothing behind.
    """

    task_ids: Tensor | None = None
    attention_mask: Tensor | None = None
    pool_mask: Tensor | None = None
    pooled_cache: dict[str, Tensor] | None = None
    recording: bool = True
    aux_losses: dict[str, list[Tensor]] = field(default_factory=dict)
    collect_stats: bool = False
    stats: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    collect_selections: bool = False
    selections: dict[str, Tensor] = field(default_factory=dict)
    handover: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def add_aux_loss(self, kind: str, value: Tensor) -> None:
        # Gradient-checkpointing recomputation re-runs layers after forward returned: not recorded.
        if self.recording:
            self.aux_losses.setdefault(kind, []).append(value)


def _batch_task_ids(task_ids: Tensor, batch: int) -> Tensor:
    """Task ids for a batch that generation may have expanded (beams, num_return_sequences)."""
    if task_ids.shape[0] == batch:
        return task_ids
    if batch % task_ids.shape[0] == 0:
        return task_ids.repeat_interleave(batch // task_ids.shape[0])
    raise ValueError(f"task_ids has {task_ids.shape[0]} entries but the batch has {batch} samples")


def valid_token_mask(x: Tensor, ctx: RoutingContext | None) -> Tensor:
    """(batch, seq) float mask of non-padding positions of ``x`` (all ones when unknown)."""
    mask = None if ctx is None else ctx.attention_mask
    if mask is None or mask.shape[:2] != x.shape[:2]:
        return x.new_ones(x.shape[:2], dtype=torch.float32)
    return mask.to(device=x.device, dtype=torch.float32)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x: (batch, seq, d)`` over positions where ``mask: (batch, seq)`` is 1."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def pooled_input(x: Tensor, ctx: RoutingContext | None, key: str, include_padding: bool = False) -> Tensor:
    """Instance representation ``(batch, d_in)``: the mean of ``x`` over the sample's tokens.

    ``include_padding=False`` (default) averages the sample's prompt tokens (``ctx.pool_mask``;
    without labels, every non-padding token), so training and generation route on the same thing;
    ``True`` averages every position as VT-NLP/MixLoRA's selector does (selector.py:135-139).
    In generation the prompt's pooled input is cached per layer and reused for decode steps.
    """
    cache = None if ctx is None else ctx.pooled_cache
    if cache is not None and key in cache:
        return cache[key]
    if include_padding:
        mask = x.new_ones(x.shape[:2])
    elif ctx is not None and ctx.pool_mask is not None and ctx.pool_mask.shape[:2] == x.shape[:2]:
        mask = ctx.pool_mask.to(device=x.device, dtype=torch.float32)
    else:
        mask = valid_token_mask(x, ctx)
    pooled = masked_mean(x, mask)
    if cache is not None:
        cache[key] = pooled
    return pooled


def task_gate(task_ids: Tensor, num_experts: int, batch: int) -> Tensor:
    """One-hot ``(batch, 1, N)`` weights: each sample goes to the expert of its task (AsymLoRA Eq. 2).

    The ids are validated once per forward by the wrapper; nothing here reads them back to the
    host (that would synchronise the GPU in every layer).
    """
    task_ids = _batch_task_ids(task_ids, batch)
    return one_hot(task_ids.long(), num_experts).unsqueeze(1)


def one_hot(index: Tensor, n: int) -> Tensor:
    """Float one-hot without F.one_hot's host-side range check (a GPU sync)."""
    return torch.zeros(*index.shape, n, device=index.device).scatter_(-1, index.unsqueeze(-1), 1.0)


def hard_task_index(ctx: RoutingContext | None, config, batch: int) -> Tensor | None:
    """The expert index per sample when routing sends whole samples by task id, else None."""
    if ctx is None or ctx.task_ids is None or config.routing not in ("task", "task_supervised"):
        return None
    return _batch_task_ids(ctx.task_ids, batch)


def soft_gate(logits: Tensor) -> Tensor:
    """Dense softmax gate (HydraLoRA's code), computed in float32."""
    return torch.softmax(logits.float(), dim=-1)


def topk_gate(probs: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest probabilities and renormalise them to sum to one."""
    top = probs.topk(k, dim=-1)
    kept = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    return kept / kept.sum(-1, keepdim=True)


def argmax_gate(probs: Tensor) -> Tensor:
    """One-hot of the most probable expert (task-supervised inference without task ids)."""
    return one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)


def switch_load_balancing_loss(probs: Tensor, dispatch: Tensor, mask: Tensor) -> Tensor:
    """Switch Transformer auxiliary loss ``N · Σ_e f_e · P_e`` over valid tokens.

    probs, dispatch: (batch, seq, N); dispatch marks the experts each token was sent to; f_e is the
    share of dispatches that went to e (for top-k each token counts 1/k), P_e the mean probability.
    Equals 1 for perfectly balanced routing.
    """
    n = probs.shape[-1]
    m = mask.unsqueeze(-1)
    tokens = mask.sum().clamp_min(1.0)
    dispatch = dispatch / dispatch.sum(-1, keepdim=True).clamp_min(1.0)
    fraction = (dispatch.detach() * m).sum((0, 1)) / tokens
    mean_prob = (probs * m).sum((0, 1)) / tokens
    return n * (fraction * mean_prob).sum()


def mole_load_balancing_loss(probs: Tensor, mask: Tensor) -> Tensor:
    """LLaVA-MoLE / MLLM-HydraLoRA form: per sample ``Σ_e mean_t(p_e) · mean_t(onehot_e(argmax p))``.

    The one-hot is detached and there is no ×N factor, as in the authors' moe.py; batch mean.
    """
    onehot = argmax_gate(probs).detach()
    m = mask.unsqueeze(-1)
    tokens = mask.sum(1, keepdim=True).clamp_min(1.0)
    mean_prob = (probs * m).sum(1) / tokens
    mean_onehot = (onehot * m).sum(1) / tokens
    return (mean_prob * mean_onehot).sum(-1).mean()


def task_supervision_loss(logits: Tensor, task_ids: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy of the gate's logits ``(batch, seq, N)`` to each sample's task id, valid tokens only."""
    targets = task_ids.long().view(-1, 1).expand(logits.shape[:2])
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), reduction="none")
    ce = ce.view(logits.shape[:2]) * mask
    return ce.sum() / mask.sum().clamp_min(1.0)


def gate_entropy(probs: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy (nats) of the gate distribution over valid tokens."""
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return (ent * mask).sum() / mask.sum().clamp_min(1.0)


def expert_weights(x: Tensor, ctx: RoutingContext | None, router: torch.nn.Module | None, config, key: str) -> Tensor:
    """Gate weights ``(batch, seq or 1, N)`` of an expert layer, recording aux losses and stats.

    routing="task": the sample's task id picks its expert (one-hot).
    routing="soft": softmax(router(x)). routing="topk": top_k of the softmax, renormalised.
    routing="task_supervised": with task ids, as "task", and the router is trained towards the
    task id by cross-entropy; without task ids, the router's argmax picks the expert, so inference
    routes as training did.
    Granularity "instance" feeds the router the sample's mean non-padding input.
    """
    n = config.num_experts
    batch = x.shape[0]
    task_ids = None if ctx is None else ctx.task_ids
    if config.routing == "task":
        if task_ids is None:
            raise ValueError("routing='task' needs task_ids: call model(..., task_ids=...)")
        return task_gate(task_ids.to(x.device), n, batch)

    mask = valid_token_mask(x, ctx)
    if config.granularity == "instance":
        router_input = pooled_input(x, ctx, key).unsqueeze(1)
        mask = mask.new_ones(batch, 1)
    else:
        router_input = x
    logits = router_logits(router, router_input, getattr(config, "compute_dtype", "float32"))
    probs = soft_gate(logits)

    if config.routing == "task_supervised":
        if task_ids is not None:
            task_ids = _batch_task_ids(task_ids.to(x.device), batch)
            weights = task_gate(task_ids, n, batch).expand_as(probs)
            if ctx is not None and torch.is_grad_enabled():
                ctx.add_aux_loss("task_supervision", task_supervision_loss(logits, task_ids, mask))
        else:
            weights = argmax_gate(probs)
    elif config.routing == "soft":
        weights = probs
    else:
        weights = topk_gate(probs, config.top_k)

    if ctx is not None and config.routing in ("soft", "topk") and torch.is_grad_enabled():
        if config.load_balancing == "switch":
            ctx.add_aux_loss("load_balancing", switch_load_balancing_loss(probs, (weights > 0).float(), mask))
        elif config.load_balancing == "mole":
            ctx.add_aux_loss("load_balancing", mole_load_balancing_loss(probs, mask))
    if ctx is not None:
        record_routing(ctx, key, probs, weights, mask)
    return weights


def router_logits(router: torch.nn.Module, x: Tensor, compute_dtype: str) -> Tensor:
    """The gate's logits. With ``compute_dtype="input"`` the GEMM runs in the input's dtype (or
    autocast's), as the adapter's own matmuls do: a float32 copy of every activation, and of its
    gradient, is what made the token gate cost more than the adapter under a bf16 base. The
    softmax is float32 either way (:func:`soft_gate`).

    N = 3 logits make rows 6 bytes long in bf16, and cuBLAS then leaves its Hopper kernels for old
    alignment-1 ones (three GEMMs a layer that cost more than the adapter's); zero rows pad the
    gate to a multiple of 8 outputs and the logits are the first N."""
    if compute_dtype != "input" or not x.is_floating_point():
        return router(x.to(router.weight.dtype))
    n = router.weight.shape[0]
    logits = F.linear(x, F.pad(router.weight, (0, 0, 0, -n % 8)).to(x.dtype))[..., :n]
    return logits if router.bias is None else logits + router.bias.to(logits.dtype)


def hard_route(x: Tensor, ctx: RoutingContext | None, router: torch.nn.Module | None, config, key: str) -> Tensor | None:
    """The expert index per sample when whole samples go by task id (None otherwise), with what
    the gate records on the way (task_supervised's loss; statistics when asked for)."""
    index = hard_task_index(ctx, config, x.shape[0])
    if index is not None and (config.routing != "task" or ctx.collect_stats or ctx.collect_selections):
        expert_weights(x, ctx, router, config, key)
    return index


def record_routing(ctx: RoutingContext, key: str, probs: Tensor, weights: Tensor, mask: Tensor) -> None:
    """Store usage / entropy statistics and per-instance selections when the context asks for them."""
    if not ctx.recording or not (ctx.collect_stats or ctx.collect_selections):
        return
    with torch.no_grad():
        m = mask.unsqueeze(-1)
        per_instance = (weights.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
        if ctx.collect_stats:
            ctx.stats[key] = {
                "usage": per_instance.mean(0).cpu(),
                "entropy": gate_entropy(probs.float(), mask).cpu(),
            }
        if ctx.collect_selections:
            ctx.selections[key] = per_instance.cpu()
