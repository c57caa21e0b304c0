"""The frozen linear and its low-rank update in one op, with the update accumulated inside the
frozen GEMM (forward and backward).

    y = x Wᵀ (+ bias) + s · (x_a A_bᵀ) B_bᵀ        per sample b

Every routed method is this op once routing is decided: AsymLoRA with task routing (A shared, B
the sample's expert), LoRA-MoE (A and B the sample's expert), MixLoRA (A and B the sample's
selected factors). A soft or top-k gate makes it ``s · Σ_i g_i (x_a A_iᵀ) B_iᵀ`` (the N B's side
by side, one GEMM; the gate gets its gradient inside). The op selects each sample's factors from
the parameter tables itself and scatters their gradients back (``index_add_`` in float32), and
casts the float32 parameters to the input's dtype: a handful of kernels per linear instead of
autograd's gather, index_put and cast nodes. x_a is the adapter's input (x after LoRA dropout; None when it is x itself).

Why an op of its own: the adapter's cost at these shapes is memory traffic, not FLOPs (a rank-32
update is ~4 % of the frozen GEMM's FLOPs). Written as ``base(x) + delta(x)``, autograd spends
about ten passes over activation-sized tensors per linear (delta written and read, the sum
written, the two input gradients written, read and summed again). Here the update is written
once and the frozen GEMM adds it in its epilogue (``addmm_`` with beta = 1, in place), and in the
backward the low-rank input gradient is written once and the frozen GEMM ``G W`` accumulates onto
it: six passes (x read twice, the update written, G read twice, grad x written once).

Linears that read the same x (a layer's q, k and v; an MLP's gate and up) run as one op, a group
(:func:`lowrank_linear_group`; one linear is a group of one): one GEMM computes every member's
``x Aᵀ`` and, in the backward, one GEMM every A's gradient and one the whole low-rank input
gradient, onto which each member's frozen ``G_i W_i`` accumulates in place. x is read twice for
the group instead of twice per linear, and autograd no longer writes one input gradient per linear
and sums them.

It is a ``torch.autograd.Function``. torch.compile traces it: the compiler fuses the selection,
casts and gradient scatter into a few kernels, and the two in-place accumulations are one small
``torch.library`` op that mutates its output (``asymlora::accumulate_mm_``), which the compiler
writes in place (a functional ``addmm`` would copy the update into a fresh buffer first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


def _factor(table: Tensor, index: Tensor | None, dtype: torch.dtype, rows_transposed: bool = False) -> Tensor:
    """A factor in compute dtype: ``table`` itself (shared ``(p, q)`` or per-sample ``(batch, p, q)``)
    when ``index`` is None; ``table[index]`` for a table of matrices ``(N, p, q)`` and ``index:
    (batch,)``; the rows ``table[index]`` ``(batch, r, q)`` of a table of vectors ``(E, q)`` for
    ``index: (batch, r)`` (transposed to ``(batch, q, r)`` when ``rows_transposed``)."""
    if index is None:
        return table.to(dtype)
    if index.dim() == 1:
        return table.index_select(0, index).to(dtype)
    rows = table.index_select(0, index.reshape(-1)).to(dtype).view(*index.shape, table.shape[-1])
    return rows.transpose(1, 2) if rows_transposed else rows


def _grad_dtype(table: Tensor, index: Tensor | None) -> torch.dtype:
    """The dtype a factor's gradient is computed in: the table's, summed in float32 (or wider) when
    several samples' gradients are added into one row."""
    return table.dtype if index is None else torch.promote_types(table.dtype, torch.float32)


def _factor_grad_to_table(grad: Tensor, table: Tensor, index: Tensor | None, rows_transposed: bool = False) -> Tensor:
    """The inverse of :func:`_factor` for gradients: summed into the table in float32 (or wider).

    Compiled, a table of matrices (one per expert, ``index: (batch,)``) takes its gradient as a
    sum over the batch weighted by each sample's one-hot, which the compiler writes as one
    reduction kernel (and deterministic); ``index_add_`` into zeros takes two and adds by atomics.
    Eagerly that sum would materialise N copies of the gradient: there ``index_add_`` it is."""
    if index is None:
        return grad.to(table.dtype)
    if rows_transposed:
        grad = grad.transpose(1, 2)
    acc = _grad_dtype(table, index)
    if index.dim() == 1 and torch.compiler.is_compiling():
        experts = torch.arange(table.shape[0], device=index.device)
        onehot = (index.unsqueeze(0) == experts.unsqueeze(1)).to(acc)  # (N, batch)
        per_sample = grad.reshape(1, grad.shape[0], -1).to(acc)
        return (onehot.unsqueeze(-1) * per_sample).sum(1).view(table.shape).to(table.dtype)
    grad = grad.reshape(-1, *table.shape[1:]).to(acc)
    out = torch.zeros(table.shape, dtype=acc, device=table.device).index_add_(0, index.reshape(-1), grad)
    return out.to(table.dtype)


def _times(u: Tensor, m: Tensor, transpose: bool, alpha: float = 1.0) -> Tensor:
    """``alpha · u (batch, seq, k) @ m`` (or ``mᵀ``) for a shared ``m: (p, q)`` or per-sample
    ``m: (batch, p, q)``; alpha rides in the GEMM (beta = 0 ignores the uninitialised input)."""
    m = m.transpose(-1, -2) if transpose else m
    if m.dim() == 3:
        if alpha == 1.0:
            return torch.bmm(u, m)
        return torch.baddbmm(u.new_empty(u.shape[0], u.shape[1], m.shape[-1]), u, m, beta=0, alpha=alpha)
    flat = u.reshape(-1, u.shape[-1])
    if alpha == 1.0:
        out = flat @ m
    else:
        out = torch.addmm(flat.new_empty(flat.shape[0], m.shape[-1]), flat, m, beta=0, alpha=alpha)
    return out.view(*u.shape[:-1], out.shape[-1])


# CUDA GEMMs that take bf16 / fp16 operands and write float32 (aten::mm.dtype, torch >= 2.8): the
# parameters' float32 gradients come out of the GEMM itself, not out of a GEMM and a cast kernel.
_GEMM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.bmm, "dtype")


def _outer(left: Tensor, right: Tensor, per_sample: bool, out_dtype: torch.dtype) -> Tensor:
    """``leftᵀ right`` per sample ``(batch, p, q)`` or summed over the batch ``(p, q)``, written in
    ``out_dtype`` directly where the GEMM can (half-precision operands on CUDA), else cast."""
    if per_sample:
        left, right = left.transpose(1, 2), right
        gemm = torch.bmm
    else:
        left, right = left.reshape(-1, left.shape[-1]).t(), right.reshape(-1, right.shape[-1])
        gemm = torch.mm
    if (out_dtype == torch.float32 and left.dtype in (torch.bfloat16, torch.float16) and left.is_cuda
            and _GEMM_OUT_DTYPE and not torch.compiler.is_compiling()):  # compiled: the cast fuses
        return gemm(left, right, out_dtype=out_dtype)
    return gemm(left, right).to(out_dtype)


def _b_rows(b_index: Tensor | None) -> bool:
    return b_index is not None and b_index.dim() == 2


def routed_matrices(a: Tensor, b: Tensor, a_index: Tensor | None, b_index: Tensor | None,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Each sample's ``A`` and ``B`` as :func:`lowrank_linear` selects them, in ``dtype``: A
    ``(r, d_in)`` or ``(batch, r, d_in)``, B ``(d_out, r)`` or ``(batch, d_out, r)``."""
    return _factor(a, a_index, dtype), _factor(b, b_index, dtype, rows_transposed=_b_rows(b_index))


def _addmm_into(out: Tensor, mat1: Tensor, mat2: Tensor, transpose: bool) -> None:
    """``out += mat1 @ mat2`` (``mat2ᵀ`` when transpose), in place, over the last dimensions; a
    ``mat2: (batch, p, q)`` multiplies each sample's rows (``out``, ``mat1``: ``(batch, seq, .)``)."""
    if mat2.dim() == 3:
        out.baddbmm_(mat1, mat2.transpose(1, 2) if transpose else mat2)
        return
    out.view(-1, out.shape[-1]).addmm_(mat1.reshape(-1, mat1.shape[-1]), mat2.t() if transpose else mat2)


@torch.library.custom_op("asymlora::accumulate_mm_", mutates_args=("out",))
def _accumulate_mm_op(out: Tensor, mat1: Tensor, mat2: Tensor, transpose: bool) -> None:
    _addmm_into(out, mat1, mat2, transpose)


@_accumulate_mm_op.register_fake
def _(out, mat1, mat2, transpose):
    return None


def _accumulate_mm(out: Tensor, mat1: Tensor, mat2: Tensor, transpose: bool) -> None:
    """The frozen GEMM adding itself onto what ``out`` holds (beta = 1). Traced by torch.compile it
    is an op that mutates its output: the compiler writes in place (an ``addmm`` into a fresh
    buffer would first copy the update there, a whole extra pass) and fuses everything else."""
    (_accumulate_mm_op if torch.compiler.is_compiling() else _addmm_into)(out, mat1, mat2, transpose)


def _gated_factors(a: Tensor, b: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The gated form's factors in ``dtype``: every A row stacked ``(R, d_in)`` (R = r for a shared
    A, N·r for one A per expert) and the N B's side by side ``(d_out, N·r)``, one copy kernel each."""
    n, d_out, r = b.shape
    b_cat = torch.empty(d_out, n, r, dtype=dtype, device=b.device)
    b_cat.copy_(b.permute(1, 0, 2))
    return a.reshape(-1, a.shape[-1]).to(dtype), b_cat.view(d_out, n * r)


def _gate_expand(h: Tensor, gate: Tensor, r: int) -> Tensor:
    """``v[..., i·r + j] = g_i · h[..., j]`` (shared A: h is ``(.., r)``) or ``g_i · h[..., i·r + j]``
    (an A per expert: h is ``(.., N·r)``): the gated activation the N B's read side by side."""
    return (gate.unsqueeze(-1) * h.view(*h.shape[:-1], -1, r)).flatten(-2)


class LowRankMember(NamedTuple):
    """One linear of a group that reads the same input: its frozen weight and bias, and its
    factors as :func:`lowrank_linear` takes them."""

    weight: Tensor
    bias: Tensor | None
    a: Tensor
    b: Tensor
    a_index: Tensor | None = None
    b_index: Tensor | None = None
    gate: Tensor | None = None


_FIELDS = len(LowRankMember._fields)


def _select(m: LowRankMember, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A member's A (rows stacked: ``(R, d_in)`` or per sample ``(batch, R, d_in)``) and B in ``dtype``."""
    if m.gate is None:
        return routed_matrices(m.a, m.b, m.a_index, m.b_index, dtype)
    return _gated_factors(m.a, m.b, dtype)


def _stack_a(a_ms: list[Tensor], batch: int) -> Tensor:
    """The members' A's as one ``(ΣR, d_in)`` (or per sample ``(batch, ΣR, d_in)``): one GEMM reads x
    for all of them. A shared A next to per-sample ones is broadcast over the batch."""
    if len(a_ms) == 1:
        return a_ms[0]
    if any(a.dim() == 3 for a in a_ms):
        a_ms = [a if a.dim() == 3 else a.expand(batch, *a.shape) for a in a_ms]
    return torch.cat(a_ms, dim=-2)


def _columns(h: Tensor, sizes: list[int]) -> list[Tensor]:
    """``h``'s last dimension cut into the members' blocks (views: the GEMMs read them strided)."""
    return [h] if len(sizes) == 1 else list(h.split(sizes, dim=-1))


def _forward(x: Tensor, x_a: Tensor | None, members: list[LowRankMember],
             scaling: float) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor], list[tuple[int, int]]]:
    """The outputs, and what the backward needs: h = s · x_a [A_1; A_2; ...]ᵀ, the stacked A, each B,
    and each member's (rows of A, dims of its selected A)."""
    src = x if x_a is None else x_a
    selected = [_select(m, x.dtype) for m in members]
    layout = [(a_m.shape[-2], a_m.dim()) for a_m, _ in selected]
    sizes = [rows for rows, _ in layout]
    a_cat = _stack_a([a_m for a_m, _ in selected], x.shape[0])
    h = _times(src, a_cat, transpose=True, alpha=scaling)  # (batch, seq, ΣR): x read once for all
    outs = []
    for m, (_, b_m), h_m in zip(members, selected, _columns(h, sizes)):
        u = h_m if m.gate is None else _gate_expand(h_m, m.gate.to(x.dtype), m.b.shape[-1])
        outs.append(_member_output(x, u, b_m, m.weight, m.bias))
    return outs, h, a_cat, [b_m for _, b_m in selected], layout


def _member_output(x: Tensor, u: Tensor, b_m: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``u B_mᵀ + bias + x Wᵀ``: the update written once, the frozen GEMM adding itself onto it."""
    out = _times(u, b_m, transpose=True)  # (batch, seq, d_out)
    if bias is not None:
        out.add_(bias)
    _accumulate_mm(out, x, weight, transpose=True)
    return out


def _gated_grads(grad: Tensor, b: Tensor, gate: Tensor, b_m: Tensor, h: Tensor, scaling: float,
                 need_b: bool, need_gate: bool) -> tuple:
    """The gated form's dL/d(x_a Aᵀ) and the gradients of b and the gate."""
    n, d_out, r = b.shape
    g = gate.to(grad.dtype)
    gv = _times(grad, b_m, transpose=False).view(*grad.shape[:-1], n, r)  # dL/dv, (batch, seq, N, r)
    hv = h.view(*h.shape[:-1], -1, r)
    grad_gate = grad_b = None
    if need_gate:  # v = g ⊗ h: dL/dg_i = Σ_j dL/dv_ij h_j, summed over what the gate broadcasts over
        acc = torch.promote_types(grad.dtype, torch.float32)
        grad_gate = (gv.to(acc) * hv.to(acc)).sum(-1).sum_to_size(gate.shape).to(gate.dtype)
    gh = gv * (g * scaling).unsqueeze(-1)  # dL/d(x_a Aᵀ) per expert block
    gh = gh.sum(-2) if hv.shape[-2] == 1 else gh.flatten(-2)  # (batch, seq, R)
    if need_b:
        v = _gate_expand(h, g, r)
        grad_b = _outer(grad, v, False, b.dtype).view(d_out, n, r).permute(1, 0, 2).contiguous()
    return gh, grad_b, grad_gate


def _a_grad_to_table(grad: Tensor, m: LowRankMember, selected_dim: int) -> Tensor:
    """A member's block of the stacked A's gradient, back into its parameter table."""
    if grad.dim() == 3 and selected_dim == 2:
        grad = grad.sum(0)  # a shared A that was broadcast next to per-sample ones
    if m.gate is not None:
        return grad.reshape(m.a.shape).to(m.a.dtype)
    return _factor_grad_to_table(grad, m.a, m.a_index)


def _backward(grads: tuple[Tensor, ...], x: Tensor, x_a: Tensor | None, members: list[LowRankMember], h: Tensor,
              a_cat: Tensor, b_ms: list[Tensor], layout: list[tuple[int, int]], scaling: float,
              needs: list[bool]) -> tuple[Tensor | None, Tensor | None, list[list[Tensor | None]]]:
    """Gradients of x, x_a and, per member, of (weight, bias, a, b, a_index, b_index, gate)."""
    sizes, selected_dims = [rows for rows, _ in layout], [dim for _, dim in layout]
    need_x, need_xa = needs[0], needs[1]
    src = x if x_a is None else x_a
    flats, ghs, member_grads, need_as = [], [], [], []
    for i, (m, b_m, h_m) in enumerate(zip(members, b_ms, _columns(h, sizes))):
        need_w, need_bias, need_a, need_b, _, _, need_gate = needs[2 + i * _FIELDS: 2 + (i + 1) * _FIELDS]
        need_as.append(need_a)
        grad = grads[i].contiguous()
        flat = grad.view(-1, grad.shape[-1])
        mg: list[Tensor | None] = [None] * _FIELDS
        if m.gate is None:
            gh = _times(grad, b_m, transpose=False, alpha=scaling)  # dL/d(x_a Aᵀ): (batch, seq, r)
            if need_b:
                g_b = _outer(grad, h_m, b_m.dim() == 3, _grad_dtype(m.b, m.b_index))
                mg[3] = _factor_grad_to_table(g_b, m.b, m.b_index, _b_rows(m.b_index))
        else:
            gh, mg[3], mg[6] = _gated_grads(grad, m.b, m.gate, b_m, h_m, scaling, need_b, need_gate)
        if need_w:
            mg[0] = flat.t() @ x.reshape(-1, x.shape[-1])
        if need_bias:
            mg[1] = flat.sum(0)
        flats.append(flat)
        ghs.append(gh)
        member_grads.append(mg)
    gh = ghs[0] if len(ghs) == 1 else torch.cat(ghs, dim=-1)  # (batch, seq, ΣR): small
    if any(need_as):  # every A's gradient in one GEMM over x
        acc = _grad_dtype(members[0].a, members[0].a_index)
        for m in members[1:]:
            acc = torch.promote_types(acc, _grad_dtype(m.a, m.a_index))
        grad_a = _outer(gh, src, a_cat.dim() == 3, acc)
        blocks = [grad_a] if len(sizes) == 1 else grad_a.split(sizes, dim=-2)
        for i, (m, block) in enumerate(zip(members, blocks)):
            if need_as[i]:
                member_grads[i][2] = _a_grad_to_table(block, m, selected_dims[i])
    grad_x = grad_xa = None
    if x_a is None:
        if need_x:
            grad_x = _times(gh, a_cat, transpose=False)  # the low-rank input gradient, written once ...
            for m, flat in zip(members, flats):
                _accumulate_mm(grad_x, flat, m.weight, transpose=False)  # ... each G W accumulates onto it
    else:
        if need_x:
            grad_x = (flats[0] @ members[0].weight).view(x.shape)  # a group of one: x_a is per linear
        if need_xa:
            grad_xa = _times(gh, a_cat, transpose=False)
    return grad_x, grad_xa, member_grads


def _distinct(fields: list[Tensor | None]) -> tuple[list[Tensor], tuple[int, ...]]:
    """Each distinct tensor once, and where each field finds it (-1: None). Members share index
    tensors (one task index for q, k and v), and torch.compile cannot trace an autograd.Function
    that takes one tensor twice."""
    distinct: list[Tensor] = []
    slots = []
    for t in fields:
        if t is None:
            slots.append(-1)
            continue
        for j, seen in enumerate(distinct):
            if seen is t:
                slots.append(j)
                break
        else:
            slots.append(len(distinct))
            distinct.append(t)
    return distinct, tuple(slots)


def _members(distinct: tuple[Tensor, ...], slots: tuple[int, ...]) -> list[LowRankMember]:
    fields = [None if j < 0 else distinct[j] for j in slots]
    return [LowRankMember(*fields[i:i + _FIELDS]) for i in range(0, len(fields), _FIELDS)]


class _LowRankGroup(torch.autograd.Function):
    """Inputs: x, x_a, scaling, the members' field slots, then the distinct tensors of their fields
    (LowRankMember order); one output per member."""

    @staticmethod
    def forward(ctx, x, x_a, scaling, slots, *distinct):
        members = _members(distinct, slots)
        outs, h, a_cat, b_ms, layout = _forward(x, x_a, members, scaling)
        ctx.save_for_backward(x, x_a, h, a_cat, *b_ms, *distinct)
        ctx.scaling, ctx.layout, ctx.slots, ctx.count = scaling, layout, slots, len(members)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        x, x_a, h, a_cat = saved[:4]
        b_ms, distinct = list(saved[4:4 + ctx.count]), saved[4 + ctx.count:]
        members = _members(distinct, ctx.slots)
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 *(j >= 0 and ctx.needs_input_grad[4 + j] for j in ctx.slots)]
        grad_x, grad_xa, member_grads = _backward(grads, x, x_a, members, h, a_cat, b_ms, ctx.layout,
                                                  ctx.scaling, needs)
        distinct_grads: list[Tensor | None] = [None] * len(distinct)
        for j, g in zip(ctx.slots, (g for mg in member_grads for g in mg)):
            if g is not None:
                distinct_grads[j] = g if distinct_grads[j] is None else distinct_grads[j] + g
        return (grad_x, grad_xa, None, None, *distinct_grads)


def lowrank_linear_group(x: Tensor, members: Sequence[LowRankMember], scaling: float,
                         x_adapter: Tensor | None = None) -> list[Tensor]:
    """:func:`lowrank_linear` for several linears that read the same ``x`` (a layer's q, k and v;
    an MLP's gate and up): one GEMM computes every member's ``x Aᵀ`` and, in the backward, one
    GEMM every A's gradient and one the whole low-rank input gradient, onto which each frozen
    ``G_i W_i`` accumulates in place (autograd would write and sum one input gradient per linear).
    Returns each member's output; ``scaling`` is common to all."""
    members = [m if isinstance(m, LowRankMember) else LowRankMember(*m) for m in members]
    if not members:
        raise ValueError("lowrank_linear_group needs at least one member")
    if x_adapter is not None and len(members) > 1:
        raise ValueError("a group shares its input: x_adapter (dropout) is for one linear at a time")
    for i, m in enumerate(members):
        if m.gate is not None and (m.a_index is not None or m.b_index is not None or m.b.dim() != 3):
            raise ValueError(f"member {i}: a gated update takes the expert tables (b: (N, d_out, r)) and no indices")
    scaling = float(scaling)
    distinct, slots = _distinct([t for m in members for t in m])
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, x_adapter, *distinct))
    if not wants_grad:  # inference: nothing to save
        return _forward(x, x_adapter, members, scaling)[0]
    return list(_LowRankGroup.apply(x, x_adapter, scaling, slots, *distinct))


def lowrank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
                   x_adapter: Tensor | None = None, a_index: Tensor | None = None,
                   b_index: Tensor | None = None, gate: Tensor | None = None) -> Tensor:
    """``x Wᵀ + bias + s · (x_adapter A_bᵀ) B_bᵀ`` for ``x: (batch, seq, d_in)``, per sample b.

    Without an index, a is ``(r, d_in)`` (shared) or ``(batch, r, d_in)`` and b ``(d_out, r)`` or
    ``(batch, d_out, r)``. With ``a_index: (batch,)``, a is a table ``(N, r, d_in)`` and sample b
    uses ``a[a_index[b]]`` (b likewise, ``(N, d_out, r)``); with ``a_index: (batch, r)``, a is a
    table of rows ``(E, d_in)`` and sample b's A stacks rows ``a_index[b]`` (b: rows ``(E, d_out)``
    and ``b_index: (batch, r)`` make B's columns). Factors may be float32: they are cast to x's
    dtype inside and their gradients come back in their own dtype.

    With ``gate: (batch, seq or 1, N)`` (a soft or top-k gate, per token or per instance) the
    update is gated instead, ``s · Σ_i g_i (x_adapter A_iᵀ) B_iᵀ``, with b ``(N, d_out, r)`` and a
    ``(r, d_in)`` (AsymLoRA's shared A) or ``(N, r, d_in)`` (LoRA-MoE); no indices. The gate gets its
    gradient.
    """
    member = LowRankMember(weight, bias, a, b, a_index, b_index, gate)
    return lowrank_linear_group(x, [member], scaling, x_adapter)[0]


def stack_factors(factors: Sequence[tuple[Tensor, Tensor]], batch: int) -> tuple[Tensor, Tensor] | None:
    """The factors of linears that read the same input, each already selected, cast and scaled
    (``A: (r, d_in)`` or ``(batch, r, d_in)``, ``B: (d_out, r)`` or ``(batch, d_out, r)``), stacked
    for :func:`lowrank_linear_prepared`: every A's rows ``(M·r, d_in)`` and every B along d_out
    ``(Σd_out, r)``, per sample where any member's is. None when their ranks differ."""
    r = factors[0][1].shape[-1]
    if any(a.shape[-2] != r or b.shape[-1] != r for a, b in factors):
        return None
    b_ms = [b for _, b in factors]
    if any(b.dim() == 3 for b in b_ms) and len(b_ms) > 1:
        b_ms = [b if b.dim() == 3 else b.expand(batch, *b.shape) for b in b_ms]
    b_cat = b_ms[0] if len(b_ms) == 1 else torch.cat(b_ms, dim=-2)
    return _stack_a([a for a, _ in factors], batch).contiguous(), b_cat.contiguous()


def lowrank_linear_prepared(x: Tensor, frozen: Sequence[tuple[Tensor, Tensor | None]], a: Tensor,
                            b: Tensor, frozen_rows: Tensor | None = None) -> list[Tensor]:
    """Inference for linears that read the same ``x`` with factors fixed for a whole call (each
    sample's routing decided, as in ``generate``), stacked once by :func:`stack_factors`:
    ``y_m = x W_mᵀ + bias_m + (x A_mᵀ) B_mᵀ`` for each ``frozen[m] = (W_m, bias_m)``.

    Eagerly (and for several tokens a sample) the op's GEMMs: one ``x Aᵀ`` for all members, then
    per member the update, onto which the frozen GEMM accumulates. A compiled decode step on a GPU
    (one token a sample) is launch-bound, not GEMM-bound: there both products are written as
    float32 sums (over d_in, then over r; :func:`_decode_outputs`) that the compiler turns into one
    reduction kernel each, the second fused with the frozen outputs' addition: two kernels for the
    group where cuBLAS took a split-K GEMM and its reduction for ``x Aᵀ`` and a GEMM per member.

    ``frozen_rows``, for a stacked A that is one for all samples (2-D): a tensor whose first rows
    are ``W_0`` itself (the same memory) and whose next ``M·r`` rows the caller has filled with
    ``a`` (:func:`write_frozen_rows`, once a call): member 0's frozen GEMM then also yields
    ``x Aᵀ`` (in a decode step, one kernel fewer for the group).
    """
    r = b.shape[-1]
    sizes = [w.shape[0] for w, _ in frozen]
    if frozen_rows is not None:
        _check_rows(frozen_rows, frozen[0][0])
        if a.dim() != 2 or frozen_rows.shape[0] < sizes[0] + a.shape[0] or frozen_rows.dtype != x.dtype:
            frozen_rows = None
    if _decode_by_sums(x):
        return _decode_outputs(x, frozen, a, b, sizes, frozen_rows)
    if frozen_rows is None:
        h = _times(x, a, transpose=True)  # (batch, seq, M·r)
        first = None
    else:
        h, first = _frozen_with_rows(x, frozen_rows, frozen[0], a.shape[0])
    outs = []
    for i, ((w, bias), h_m, b_m) in enumerate(zip(frozen, h.split(r, dim=-1), b.split(sizes, dim=-2))):
        if i == 0 and first is not None:
            _accumulate_mm(first, h_m, b_m, transpose=True)
            outs.append(first)
        else:
            outs.append(_member_output(x, h_m, b_m, w, bias))
    return outs


def _check_rows(rows: Tensor, weight: Tensor) -> None:
    """``rows`` must hold ``weight`` as its first rows (the same memory; checked eagerly: a compiled
    graph cannot read addresses, the caller keeps them linked there)."""
    if rows.dim() != 2 or rows.shape[1] != weight.shape[1] or rows.dtype != weight.dtype:
        raise ValueError(f"frozen_rows {tuple(rows.shape)} {rows.dtype} cannot extend a weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if not torch.compiler.is_compiling() and not (
            rows.data_ptr() == weight.data_ptr() and rows.device == weight.device and weight.is_contiguous()):
        raise ValueError("frozen_rows must hold member 0's weight as its first rows (the same memory)")


def _frozen_with_rows(x: Tensor, rows: Tensor, frozen: tuple[Tensor, Tensor | None],
                      r_total: int) -> tuple[Tensor, Tensor]:
    """``(h, y_0)`` from one GEMM over all the rows: its first ``d_out`` columns are member 0's
    frozen output (+ bias), the next ``r_total`` are ``h = x Aᵀ``; views of one output."""
    d_out, bias = frozen[0].shape[0], frozen[1]
    y = _times(x, rows, transpose=True)
    out = y[..., :d_out]
    if bias is not None:
        out.add_(bias)
    return y[..., d_out:d_out + r_total], out


def write_frozen_rows(frozen_rows: Tensor, d_out: int, a: Tensor) -> None:
    """Write a stacked A ``(R, d_in)`` below the ``d_out`` rows of the frozen weight that
    ``frozen_rows`` extends (for :func:`lowrank_linear_prepared`)."""
    with torch.no_grad():
        frozen_rows[d_out:d_out + a.shape[0]].copy_(a)


def _decode_by_sums(x: Tensor) -> bool:
    """Whether :func:`lowrank_linear_prepared` writes its products as sums: in a compiled decode
    step (one token a sample) on a GPU, where kernel launches bound the step. Not on a CPU, where
    inductor's code for them ran ~150× slower than the GEMMs (84 ms vs 0.6 ms a decode step of
    the tiny test model)."""
    return x.is_cuda and x.shape[1] == 1 and torch.compiler.is_compiling()


def _decode_outputs(x: Tensor, frozen: Sequence[tuple[Tensor, Tensor | None]], a: Tensor, b: Tensor,
                    sizes: list[int], rows: Tensor | None = None) -> list[Tensor]:
    """:func:`lowrank_linear_prepared`'s outputs with the products as sums in float32 (or wider),
    ``h = Σ_k x_k A_jk`` and the update ``Σ_j h_j B_ij``, added to the frozen outputs (which their
    GEMM writes in x's dtype) and rounded to x's dtype: written for the compiler to fuse; correct
    eagerly too, where it materialises the products. The frozen part is thus rounded twice where
    the GEMMs' form rounds it once (in bf16 a relative error of about 2.4e-3 against 1.7e-3 at
    d_in 4096 with a 6 % update; the tests bound it by twice the reference's own). With ``rows``
    (A written below member 0's weight), h is not a sum but the last columns of member 0's frozen
    GEMM, rounded to x's dtype as the GEMMs' form rounds it: one reduction kernel fewer."""
    batch, seq, r = x.shape[0], x.shape[1], b.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    frozen_out = [torch.nn.functional.linear(x, w, bias) for w, bias in frozen[1:]]
    if rows is None:
        h = (x.unsqueeze(-2).to(acc) * (a if a.dim() == 2 else a.unsqueeze(1)).to(acc)).sum(-1)  # (batch, seq, M·r)
        frozen_out.insert(0, torch.nn.functional.linear(x, *frozen[0]))
    else:  # member 0's frozen GEMM yields h too (rounded to x's dtype, as the GEMMs' form does)
        y = torch.nn.functional.linear(x, rows)
        h = y[..., sizes[0]:sizes[0] + a.shape[0]].to(acc)
        bias = frozen[0][1]
        frozen_out.insert(0, y[..., :sizes[0]] if bias is None else y[..., :sizes[0]] + bias)
    if len(set(sizes)) == 1:  # members of one width (q, k, v without grouped-query heads; gate, up)
        m, d = len(sizes), sizes[0]
        update = (h.view(batch, seq, m, 1, r) * b.view(-1, 1, m, d, r).to(acc)).sum(-1)
        return list((torch.stack(frozen_out, dim=-2).to(acc) + update).to(x.dtype).unbind(-2))
    outs = []
    for y, h_m, b_m in zip(frozen_out, h.split(r, dim=-1), b.split(sizes, dim=-2)):
        b_m = b_m.unsqueeze(1) if b_m.dim() == 3 else b_m  # (batch, 1, d, r) or (d, r)
        outs.append((y.to(acc) + (h_m.unsqueeze(-2) * b_m.to(acc)).sum(-1)).to(x.dtype))
    return outs


def lowrank_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
                             x_adapter: Tensor | None = None, a_index: Tensor | None = None,
                             b_index: Tensor | None = None, gate: Tensor | None = None) -> Tensor:
    """The same in plain autograd ops, one sample (and, gated, one expert) at a time (what the
    tests compare against)."""
    src = x if x_adapter is None else x_adapter
    if gate is not None:
        out = torch.nn.functional.linear(x, weight, bias)
        for i in range(b.shape[0]):
            a_i = (a if a.dim() == 2 else a[i]).to(x.dtype)
            out = out + scaling * gate[..., i:i + 1].to(x.dtype) * ((src @ a_i.T) @ b[i].to(x.dtype).T)
        return out
    rows = []
    for i in range(x.shape[0]):
        a_i = a if a_index is None and a.dim() == 2 else a[i] if a_index is None else a[a_index[i]]
        if b_index is None:
            b_i = b if b.dim() == 2 else b[i]
        else:
            b_i = b[b_index[i]] if b_index.dim() == 1 else b[b_index[i]].T
        a_i, b_i = a_i.to(x.dtype), b_i.to(x.dtype)
        rows.append(torch.nn.functional.linear(x[i], weight, bias) + scaling * (src[i] @ a_i.T) @ b_i.T)
    return torch.stack(rows)


def lowrank_linear_group_reference(x: Tensor, members: Sequence[LowRankMember], scaling: float) -> list[Tensor]:
    """:func:`lowrank_linear_group` as one :func:`lowrank_linear_reference` per member."""
    return [lowrank_linear_reference(x, m.weight, m.bias, m.a, m.b, scaling, None, m.a_index, m.b_index, m.gate)
            for m in (LowRankMember(*m) for m in members)]
