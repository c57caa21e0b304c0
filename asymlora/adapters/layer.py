"""What every adapter layer shares: the frozen base linear, scaling, dropout, merge and unmerge."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..kernels import LowRankMember, lowrank_linear_group, lowrank_linear_prepared, routed_matrices, stack_factors
from .routing import RoutingContext, RoutingSource


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
        # Adapted linears of the same module that read the same input (AdapterModel sets them):
        # the first one called on an input computes all of theirs in one op and leaves each its
        # output, keyed by the input itself, in the forward's routing context for when it is called.
        self.siblings: tuple[AdapterLayer, ...] = ()
        # Where this layer reads the current forward's routing inputs when the caller passes none
        # (AdapterModel sets one source for all its layers and updates it at every forward).
        self.routing_source: RoutingSource | None = None
        # During ``generate`` (AdapterModel sets them): the layer's state for the call (None outside
        # a call; GENERATION_PENDING until the prompt's pass reaches its group; then, on the group's
        # first member, its stacked factors (PackedFactors once the model's store holds them), and
        # GENERATION_FOLLOWER on the others), the output the first member computed for this one,
        # and the store the model's groups keep their factors in for the call.
        self._generation: tuple[Tensor, Tensor] | PackedFactors | str | None = None
        self._handed: tuple[Tensor, Tensor] | None = None
        self._generation_store: GenerationStore | None = None

    def _new_parameter(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, device=self.base_layer.weight.device, dtype=torch.float32))

    def _expert_router(self, config) -> nn.Linear | None:
        """The gate ``Linear(d_in, N)`` of an expert layer (bias-free, nn.Linear's Kaiming init, as
        the text HydraLoRA code), or None when routing is by task id."""
        if not config.has_router:
            return None
        return nn.Linear(self.in_features, config.num_experts, bias=False, device=self.base_layer.weight.device)

    def forward(self, x: Tensor, routing: RoutingContext | None = None) -> Tensor:
        if self.merged_task is not None:
            return self.base_layer(x)
        if self._generation is not None:
            out = _generation_forward(self, x)
            if out is not None:
                return out
        if routing is None and self.routing_source is not None:
            routing = self.routing_source.context
        if self.siblings and routing is not None:
            handed = routing.handover.pop(self.name, None)
            if handed is not None:
                if handed[0] is x:  # a sibling called first on this very input computed it
                    return handed[1]
                self._leave_group()
        spec = self._fused_spec(x, routing)
        if spec is not None:
            return self._fused_with_siblings(x, spec, routing)
        result = self.base_layer(x)
        return result + self.delta(x, routing).to(result.dtype)

    def _leave_group(self) -> None:
        """Called on another input than the one a sibling computed for: the declared group does not
        share its input in this model. Every member goes back to one op each (still correct before:
        each output is only ever taken for the very input it was computed from)."""
        warnings.warn(f"{self.name}: its siblings {[s.name for s in self.siblings]} do not read the same input; "
                      "running them one op each", stacklevel=3)
        for layer in (self, *self.siblings):
            layer.siblings = ()

    def _fused_with_siblings(self, x: Tensor, spec: tuple, routing: RoutingContext | None) -> Tensor:
        """This layer's output, and, when it has siblings that read the same x, theirs in the same op:
        each is left in the forward's ``routing.handover`` under its name, keyed by x itself."""
        member, scaling, x_adapter = spec
        members, takers = [member], []
        if x_adapter is None and routing is not None:
            for sibling, sibling_spec in _sibling_specs(self, x, routing):
                if sibling_spec is not None and sibling_spec[1] == scaling:
                    members.append(sibling_spec[0])
                    takers.append(sibling.name)
        outs = _run_fused(x, members, scaling, x_adapter)
        for name, out in zip(takers, outs[1:]):
            routing.handover[name] = (x, out)
        return outs[0]

    def _fused_spec(self, x: Tensor, routing: RoutingContext | None) -> tuple | None:
        """``(LowRankMember, scaling, x_adapter)`` for the fused op (kernels.lowrank_linear), or None
        where it does not apply. It applies on the fast path, with adapter math in the input's dtype
        (or autocast's), to a plain base linear (no hooks, e.g. accelerate's offloading, that calling
        its weight directly would bypass), once routing gives one update per sample (or a gate)."""
        base = self.base_layer
        if (not (self.fast_path and self.compute_in_input_dtype and x.dim() == 3)
                or base._forward_hooks or base._forward_pre_hooks
                or not (x.dtype == base.weight.dtype or torch.is_autocast_enabled(x.device.type))):
            return None
        gate = None
        factors = self.routed_factors(x, routing)
        if factors is None:
            gated = self.gated_factors(x, routing)
            if gated is None:
                return None
            factors, gate = (gated[0], gated[1], None, None), gated[2]
        a, b, a_index, b_index = factors
        x_adapter = self.dropout(x) if _dropout_active(self) else None
        return LowRankMember(base.weight, base.bias, a, b, a_index, b_index, gate), self.scaling, x_adapter

    def _generation_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple[Tensor, Tensor] | None:
        """Each member's ``(A, s·B)`` as the samples' routing selects them, stacked for
        :func:`asymlora.kernels.lowrank_linear_prepared`; None unless every member runs as one
        routed update (no gate, no dropout, not merged) of one rank."""
        specs = [self._fused_spec(x, ctx) if not _dropout_active(self) else None]
        specs += [spec for _, spec in _sibling_specs(self, x, ctx)]
        if any(spec is None or spec[0].gate is not None for spec in specs):
            return None
        dtype = _fused_dtype(x)
        factors = []
        for member, scaling, _ in specs:  # scaled before the cast: one rounding (once a call)
            a, b = routed_matrices(member.a, member.b, member.a_index, member.b_index,
                                   torch.promote_types(dtype, member.b.dtype))
            factors.append((a.to(dtype), (b * scaling).to(dtype)))
        return stack_factors(factors, x.shape[0])

    def routed_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple | None:
        """When routing reduces the layer to one low-rank update per sample: ``(a, b, a_index,
        b_index)`` as :func:`asymlora.kernels.lowrank_linear` takes them (parameter tables and each
        sample's indices into them), routing's losses and statistics recorded. None otherwise."""
        return None

    def gated_factors(self, x: Tensor, ctx: RoutingContext | None) -> tuple | None:
        """For a gate that mixes experts (soft, top-k): ``(a, b, gate)`` as
        :func:`asymlora.kernels.lowrank_linear` takes them (gate ``(batch, seq or 1, N)``), the
        gate's losses and statistics recorded. None when the layer has no such form."""
        return None

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


# Module functions rather than methods: under torch.compile every method looked up on a layer adds
# a guard per layer (that the instance does not shadow it), evaluated before every step.
def _dropout_active(layer: AdapterLayer) -> bool:
    return layer.training and isinstance(layer.dropout, nn.Dropout)


def _sibling_specs(layer: AdapterLayer, x: Tensor,
                   routing: RoutingContext) -> list[tuple[AdapterLayer, tuple | None]]:
    """Each sibling and its ``_fused_spec`` on x; None for one that must run alone (merged, or
    under dropout: its adapter reads its own dropped-out x)."""
    return [(s, None if s.merged_task is not None or _dropout_active(s) else s._fused_spec(x, routing))
            for s in layer.siblings]


GENERATION_PENDING = "pending"  # a layer's state in a generate call before the prompt's pass reaches it
GENERATION_FOLLOWER = "follower"  # ... once the first member of its group computes its output


class PackedFactors(NamedTuple):
    """Where a group's stacked factors lie in :attr:`GenerationStore.flat`: A's and B's offsets and shapes."""

    a_offset: int
    a_shape: tuple[int, ...]
    b_offset: int
    b_shape: tuple[int, ...]


class GenerationStore:
    """Every group's stacked factors for one ``generate`` call, in one flat tensor for the model.

    Each tensor a compiled decode step reads is one of its inputs: guarded, passed through the
    compiled graph's wrappers and checked by its CUDA graph before every token. Held per group that
    made 2 a group (32 in a 4-layer Llama); in one flat tensor, one. The prompt's pass (eager) fills
    it: each group stacks its factors when it is reached (kept on its first layer meanwhile), and once
    every group of the model has been reached they are copied into :attr:`flat` in one kernel (the
    tensor reused from call to call while its size holds) and each first layer keeps a
    :class:`PackedFactors`. A group reached again later in the call (the batch changed: beams) keeps
    its own tensors."""

    def __init__(self) -> None:
        self.flat: Tensor | None = None
        self._waiting = 0  # groups of the model not yet reached by this call's prompt pass
        self._stacked: list[tuple[AdapterLayer, Tensor, Tensor]] = []

    def begin(self, groups: int) -> None:
        self._waiting, self._stacked = groups, []

    def reached(self, layer: AdapterLayer, stacked: tuple[Tensor, Tensor] | None) -> None:
        """A group's factors for the call (None: it runs the usual path); packs after the last group."""
        if self._waiting <= 0:  # stacked again later in the call: the group keeps its tensors
            return
        if stacked is not None:
            self._stacked.append((layer, *stacked))
        self._waiting -= 1
        if self._waiting == 0:
            self._pack()

    def release(self) -> None:
        self.flat, self._waiting, self._stacked = None, 0, []

    def _pack(self) -> None:
        parts = [t for _, a, b in self._stacked for t in (a, b)]
        if not parts or len({(t.dtype, t.device) for t in parts}) != 1:
            self._stacked = []
            return  # nothing stacked, or mixed dtypes (autocast off in part of the model): left unpacked
        total = sum(t.numel() for t in parts)
        flat = self.flat
        if flat is None or flat.numel() != total or flat.dtype != parts[0].dtype or flat.device != parts[0].device:
            flat = self.flat = torch.empty(total, dtype=parts[0].dtype, device=parts[0].device)
        torch.cat([t.reshape(-1) for t in parts], out=flat)
        offset = 0
        for layer, a, b in self._stacked:
            layer._generation = PackedFactors(offset, tuple(a.shape), offset + a.numel(), tuple(b.shape))
            offset += a.numel() + b.numel()
        self._stacked = []


def _generation_forward(layer: AdapterLayer, x: Tensor) -> Tensor | None:
    """A layer's output during ``generate``, where routing is fixed for the call (task ids, or
    instance routing decided on the prompt): the prompt's pass (eager) selects, casts, scales and
    stacks the factors of the layer's group of siblings once, and every step runs them through
    :func:`asymlora.kernels.lowrank_linear_prepared`, the first member called computing the others'
    outputs. None where that does not apply (a gate, dropout, a merged sibling, statistics being
    collected, gradients on): the usual path, decided once a call.

    All a decode step reads is on the layers and the model's :class:`GenerationStore` (no routing
    context, no dict of cached tensors): every value a compiled step reads is guarded before every
    token, by its path."""
    state = layer._generation
    if state == GENERATION_FOLLOWER:
        handed = layer._handed
        if handed is None:
            return None
        layer._handed = None
        return handed[1] if handed[0] is x else None
    if torch.is_grad_enabled():
        return None
    if isinstance(state, PackedFactors):
        shapes = (state.a_shape, state.b_shape)
    else:
        shapes = () if isinstance(state, str) else tuple(t.shape for t in state)
    if not shapes or any(len(shape) == 3 and shape[0] != x.shape[0] for shape in shapes):
        # not stacked yet for this call, or for another batch (beams expand it): stacked again
        if torch.compiler.is_compiling():  # nothing is stacked while compiling
            return None
        state = _prepare_generation(layer, x)
        if state is None:
            return None
    if isinstance(state, PackedFactors):
        flat = layer._generation_store.flat
        a = flat[state.a_offset:state.b_offset].view(state.a_shape)
        b = flat[state.b_offset:state.b_offset + math.prod(state.b_shape)].view(state.b_shape)
    else:
        a, b = state
    frozen = [(m.base_layer.weight, m.base_layer.bias) for m in (layer, *layer.siblings)]
    outs = _run_autocast_free(x, frozen, lambda x, frozen: lowrank_linear_prepared(x, frozen, a, b))
    for sibling, out in zip(layer.siblings, outs[1:]):
        sibling._handed = (x, out)
    return outs[0]


def _prepare_generation(layer: AdapterLayer, x: Tensor) -> tuple[Tensor, Tensor] | PackedFactors | None:
    """Stack the group's factors for the call, hand them to the model's store and make the layer's
    siblings followers; or record that the group runs the usual path."""
    ctx = None if layer.routing_source is None else layer.routing_source.context
    stacked = None
    if ctx is None or not (ctx.collect_stats or ctx.collect_selections):
        stacked = layer._generation_factors(x, ctx)
    if stacked is None:
        for member in (layer, *layer.siblings):
            member._generation = None
    else:
        layer._generation = stacked
        for sibling in layer.siblings:
            sibling._generation, sibling._handed = GENERATION_FOLLOWER, None
    if layer._generation_store is not None:
        layer._generation_store.reached(layer, stacked)  # packing rewrites layer._generation
    return layer._generation


def _fused_dtype(x: Tensor) -> torch.dtype:
    """The dtype the fused op runs in: autocast's when it is on (as for F.linear), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _run_autocast_free(x: Tensor, frozen: list[tuple[Tensor, Tensor | None]], op):
    """``op(x, frozen)``; under autocast x and the frozen weights and biases go to autocast's dtype
    and the op runs with autocast off (its in-place accumulation needs one dtype; it casts the
    factors itself)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return op(x, frozen)
    dtype = _fused_dtype(x)
    frozen = [(w.to(dtype), None if bias is None else bias.to(dtype)) for w, bias in frozen]
    with torch.autocast(device, enabled=False):
        return op(x.to(dtype), frozen)


def _run_fused(x: Tensor, members: list[LowRankMember], scaling: float, x_adapter: Tensor | None) -> list[Tensor]:
    """The group op on ``x``, autocast-free (:func:`_run_autocast_free`)."""
    if x_adapter is not None and torch.is_autocast_enabled(x.device.type):
        x_adapter = x_adapter.to(_fused_dtype(x))

    def op(x, frozen):
        ms = [m._replace(weight=w, bias=bias) for m, (w, bias) in zip(members, frozen)]
        return lowrank_linear_group(x, ms, scaling, x_adapter)
    return _run_autocast_free(x, [(m.weight, m.bias) for m in members], op)
