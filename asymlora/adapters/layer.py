"""What every adapter layer shares: the frozen base linear, scaling, dropout, merge and unmerge."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..kernels import (LowRankMember, lowrank_linear_group, lowrank_linear_prepared, routed_matrices, stack_factors,
                       write_frozen_rows)
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
        # first member, its stacked factors, and GENERATION_FOLLOWER on the others), the output the
        # first member computed for this one, and the buffers the stacked factors live in between
        # calls (the same addresses at every call: a compiled decode step's CUDA graph keeps them).
        self._generation: tuple[Tensor, Tensor] | str | None = None
        self._handed: tuple[Tensor, Tensor] | None = None
        self._generation_buffers: tuple[Tensor, Tensor] | None = None
        # On a group's first layer (AdapterModel.link_frozen_rows): a (d_out + spare, d_in) tensor whose
        # first d_out rows ARE the frozen weight's memory (the weight a view of them), the spare rows
        # room for the group's stacked A during generate, so that a decode step's frozen GEMM also
        # computes x Aᵀ (kernels.lowrank_linear_prepared's frozen_rows); and the Parameter they hold.
        self._frozen_rows: Tensor | None = None
        self._rows_weight: nn.Parameter | None = None
        self.register_load_state_dict_post_hook(_relink_after_load)

    def shared_a_rows(self) -> int:
        """Rows of this layer's A that are one for all samples when ``generate`` stacks the factors
        (AsymLoRA's shared A under task routing): what can ride under a frozen weight. 0: none."""
        return 0

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()`` ... give the base weight new memory: the frozen rows
        follow it (rebuilt around the converted weight)."""
        result = super()._apply(fn, recurse)
        _relink_frozen_rows(self)
        return result

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


def _usable_rows(layer: AdapterLayer, x: Tensor) -> Tensor | None:
    """The layer's frozen rows where generation may read its weight through them (checked at each
    call's prompt, eagerly): still the memory of the base weight, in the dtype the op runs in. A
    weight replaced by another Parameter (FSDP2's sharding; ``load_state_dict(assign=True)`` is
    relinked by its hook) or given other memory (``param.data = ...``) lets them go."""
    rows = layer._frozen_rows
    if rows is None:
        return None
    if _rows_unlinked(layer):
        layer._frozen_rows = layer._rows_weight = None
        return None
    return rows if rows.dtype == _fused_dtype(x) else None


def _rows_unlinked(layer: AdapterLayer) -> bool:
    """Whether the layer's base weight is no longer the Parameter, or the memory, its rows hold."""
    weight = layer.base_layer.weight
    return weight is not layer._rows_weight or weight.data_ptr() != layer._frozen_rows.data_ptr()


def _rows_eligible(weight: Tensor) -> bool:
    return (type(weight) is nn.Parameter and weight.dim() == 2 and weight.is_floating_point()
            and weight.device.type != "meta" and weight.is_contiguous())


def link_frozen_rows(layer: AdapterLayer, spare: int) -> None:
    """Give the layer's frozen weight ``spare`` rows of room below it: a new ``(d_out + spare, d_in)``
    tensor takes the weight's values in its first rows and the weight becomes a view of them (the
    same Parameter: state dicts, saving, merging and tied modules see the same weight). Nothing
    where the weight is not a plain floating-point Parameter (quantized, on meta)."""
    weight = layer.base_layer.weight
    if spare <= 0 or not _rows_eligible(weight):
        layer._frozen_rows = layer._rows_weight = None
        return
    with torch.no_grad():
        rows = torch.zeros(weight.shape[0] + spare, weight.shape[1], dtype=weight.dtype, device=weight.device)
        rows[:weight.shape[0]].copy_(weight)
        weight.data = rows[:weight.shape[0]]
    torch._dynamo.mark_static_address(rows, guard=False)  # a CUDA graph reads it in place, like a parameter
    layer._frozen_rows = rows
    object.__setattr__(layer, "_rows_weight", weight)  # a reference, not a parameter of the layer


def _relink_frozen_rows(layer: AdapterLayer) -> None:
    """Rows around the base weight again where a conversion or a load gave it new memory."""
    if layer._frozen_rows is not None and _rows_unlinked(layer):
        link_frozen_rows(layer, layer._frozen_rows.shape[0] - layer.out_features)


def _relink_after_load(layer: AdapterLayer, incompatible_keys) -> None:
    """After ``load_state_dict`` (``assign=True`` puts a new Parameter in the base layer)."""
    _relink_frozen_rows(layer)


GENERATION_PENDING = "pending"  # a layer's state in a generate call before the prompt's pass reaches it
GENERATION_FOLLOWER = "follower"  # ... once the first member of its group computes its output


def _generation_forward(layer: AdapterLayer, x: Tensor) -> Tensor | None:
    """A layer's output during ``generate``, where routing is fixed for the call (task ids, or
    instance routing decided on the prompt): the prompt's pass (eager) selects, casts, scales and
    stacks the factors of the layer's group of siblings once, and every step runs them through
    :func:`asymlora.kernels.lowrank_linear_prepared`, the first member called computing the others'
    outputs. None where that does not apply (a gate, dropout, a merged sibling, statistics being
    collected, gradients on): the usual path, decided once a call.

    All a decode step reads is on the layers themselves (no routing context, no dict of cached
    tensors): every attribute a compiled step reads is guarded before every token, by its path."""
    state = layer._generation
    if state == GENERATION_FOLLOWER:
        handed = layer._handed
        if handed is None:
            return None
        layer._handed = None
        return handed[1] if handed[0] is x else None
    if torch.is_grad_enabled():
        return None
    if isinstance(state, str) or any(t.dim() == 3 and t.shape[0] != x.shape[0] for t in state[:2]):
        # not stacked yet for this call, or for another batch (beams expand it): stacked again
        if torch.compiler.is_compiling():  # nothing is stacked while compiling
            return None
        state = _prepare_generation(layer, x)
        if state is None:
            return None
    a, b, rows = state  # rows: the group's A below the layer's weight, written at the prompt (or None)
    frozen = [(m.base_layer.weight, m.base_layer.bias) for m in (layer, *layer.siblings)]
    outs = _run_autocast_free(x, frozen, lambda x, frozen: lowrank_linear_prepared(x, frozen, a, b, rows))
    for sibling, out in zip(layer.siblings, outs[1:]):
        sibling._handed = (x, out)
    return outs[0]


def _prepare_generation(layer: AdapterLayer, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Stack the group's factors for the call into the layer's buffers (reused while their shapes
    hold), and a stacked A that is one for all samples below the layer's weight too where its
    frozen rows have room; make its siblings followers. Or record that the group runs the usual path."""
    ctx = None if layer.routing_source is None else layer.routing_source.context
    stacked = None
    if ctx is None or not (ctx.collect_stats or ctx.collect_selections):
        stacked = layer._generation_factors(x, ctx)
    if stacked is None:
        for member in (layer, *layer.siblings):
            member._generation = None
        return None
    buffers = layer._generation_buffers
    if buffers is None or any(buf.shape != new.shape or buf.dtype != new.dtype or buf.device != new.device
                              for buf, new in zip(buffers, stacked)):
        buffers = layer._generation_buffers = tuple(torch.empty_like(new) for new in stacked)
    for buf, new in zip(buffers, stacked):
        buf.copy_(new)
    rows = _usable_rows(layer, x)
    if rows is not None and buffers[0].dim() == 2 and rows.shape[0] >= layer.out_features + buffers[0].shape[0]:
        write_frozen_rows(rows, layer.out_features, buffers[0])
    else:
        rows = None
    layer._generation = (*buffers, rows)
    for sibling in layer.siblings:
        sibling._generation, sibling._handed = GENERATION_FOLLOWER, None
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
