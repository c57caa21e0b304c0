"""The frozen linear and its low-rank update in one op, with the update accumulated inside the
frozen GEMM (forward and backward).

    y = x Wᵀ (+ bias) + s · (x_a Aᵀ) Bᵀ          A, B shared (2-D) or one per sample (3-D)

Every routed method is this op once routing is decided: AsymLoRA with task routing (A shared, B
the sample's expert), LoRA-MoE (A and B the sample's expert), MixLoRA (A and B the sample's
selected factors, scaled by their coefficients). x_a is the adapter's input (x after LoRA
dropout; None when it is x itself).

Why an op of its own: the adapter's cost at these shapes is memory traffic, not FLOPs (a rank-32
update is ~4 % of the frozen GEMM's FLOPs). Written as ``base(x) + delta(x)``, autograd spends
about ten passes over activation-sized tensors per linear (delta written and read, the sum
written, the two input gradients written, read and summed again). Here the update is written
once and the frozen GEMM adds it in its epilogue (``addmm_`` with beta = 1, in place), and in the
backward the low-rank input gradient is written once and the frozen GEMM ``G W`` accumulates onto
it: six passes (x read twice, the update written, G read twice, grad x written once).

Both directions are ``torch.library`` custom ops, so ``torch.compile`` keeps them as they are
(it does not decompose the in-place accumulation); the backward is an op too for the same reason.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _per_sample(t: Tensor) -> bool:
    return t.dim() == 3


def _times_factor(u: Tensor, m: Tensor, transpose: bool) -> Tensor:
    """``u (batch, seq, k) @ m`` (or ``mᵀ``) for a shared ``m: (p, q)`` or per-sample ``m: (batch, p, q)``."""
    if _per_sample(m):
        return torch.bmm(u, m.transpose(1, 2) if transpose else m)
    flat = u.reshape(-1, u.shape[-1])
    out = flat @ (m.t() if transpose else m)
    return out.view(*u.shape[:-1], out.shape[-1])


def _factor_grad(left: Tensor, right: Tensor, per_sample: bool) -> Tensor:
    """``leftᵀ right`` per sample ``(batch, p, q)`` or summed over the batch ``(p, q)``."""
    if per_sample:
        return torch.bmm(left.transpose(1, 2), right)
    return left.reshape(-1, left.shape[-1]).t() @ right.reshape(-1, right.shape[-1])


def _forward(x: Tensor, x_a: Tensor | None, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
             scaling: float) -> tuple[Tensor, Tensor]:
    src = x if x_a is None else x_a
    h = _times_factor(src, a, transpose=True)  # (batch, seq, r), scaled: saved for dB
    if scaling != 1.0:
        h.mul_(scaling)
    out = _times_factor(h, b, transpose=True)  # (batch, seq, d_out): the update, written once
    flat = out.view(-1, out.shape[-1])
    if bias is not None:
        flat.add_(bias)
    flat.addmm_(x.reshape(-1, x.shape[-1]), weight.t())  # the frozen GEMM adds itself onto it
    return out, h


@torch.library.custom_op("asymlora::lowrank_linear", mutates_args=())
def _lowrank_linear(x: Tensor, x_a: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor,
                    scaling: float) -> tuple[Tensor, Tensor]:
    return _forward(x, x_a, weight, bias, a, b, scaling)


@_lowrank_linear.register_fake
def _(x, x_a, weight, bias, a, b, scaling):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(*x.shape[:-1], a.shape[-2])


@torch.library.custom_op("asymlora::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward(grad: Tensor, x: Tensor, x_a: Optional[Tensor], weight: Tensor, a: Tensor, b: Tensor,
                             h: Tensor, scaling: float, needs: list[bool]) -> list[Tensor]:
    """Gradients of (x, x_a, weight, bias, a, b); an empty tensor where ``needs`` is False."""
    need_x, need_xa, need_w, need_bias, need_a, need_b = needs
    grad = grad.contiguous()
    flat = grad.view(-1, grad.shape[-1])
    src = x if x_a is None else x_a
    def empty() -> Tensor:  # outputs may not alias each other: a fresh one per unneeded gradient
        return grad.new_empty(0)

    gh = _times_factor(grad, b, transpose=False).mul_(scaling)  # dL/d(x_a Aᵀ), (batch, seq, r)
    grad_b = _factor_grad(grad, h, _per_sample(b)) if need_b else empty()
    grad_a = _factor_grad(gh, src, _per_sample(a)) if need_a else empty()
    grad_x, grad_xa = empty(), empty()
    if x_a is None:
        if need_x:
            grad_x = _times_factor(gh, a, transpose=False)  # written once ...
            grad_x.view(-1, grad_x.shape[-1]).addmm_(flat, weight)  # ... and G W accumulates onto it
    else:
        if need_x:
            grad_x = (flat @ weight).view(*x.shape)
        if need_xa:
            grad_xa = _times_factor(gh, a, transpose=False)
    grad_w = flat.t() @ x.reshape(-1, x.shape[-1]) if need_w else empty()
    grad_bias = flat.sum(0) if need_bias else empty()
    return [grad_x, grad_xa, grad_w, grad_bias, grad_a, grad_b]


@_lowrank_linear_backward.register_fake
def _(grad, x, x_a, weight, a, b, h, scaling, needs):
    def like(t, need):
        return t.new_empty(t.shape) if need else grad.new_empty(0)

    bias_shape = grad.new_empty(weight.shape[0]) if needs[3] else grad.new_empty(0)
    return [like(x, needs[0]), like(x if x_a is None else x_a, needs[1] and x_a is not None), like(weight, needs[2]),
            bias_shape, like(a, needs[4]), like(b, needs[5])]


def _setup_context(ctx, inputs, output):
    x, x_a, weight, bias, a, b, scaling = inputs
    ctx.save_for_backward(x, x_a, weight, a, b, output[1])
    ctx.scaling = scaling


def _backward(ctx, grad_out, grad_h):
    x, x_a, weight, a, b, h = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    grads = _lowrank_linear_backward(grad_out, x, x_a, weight, a, b, h, ctx.scaling, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None)


_lowrank_linear.register_autograd(_backward, setup_context=_setup_context)


def lowrank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
                   x_adapter: Tensor | None = None) -> Tensor:
    """``x Wᵀ + bias + s · (x_adapter Aᵀ) Bᵀ`` for ``x: (batch, seq, d_in)``.

    a: (r, d_in) shared or (batch, r, d_in) per sample; b: (d_out, r) or (batch, d_out, r).
    Every tensor in one dtype; gradients reach every input that requires them.
    """
    if not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
        # Inference (generation): the op's dispatch costs more than its kernels at decode shapes.
        return _forward(x, x_adapter, weight, bias, a, b, float(scaling))[0]
    return _lowrank_linear(x, x_adapter, weight, bias, a, b, float(scaling))[0]


def lowrank_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float,
                             x_adapter: Tensor | None = None) -> Tensor:
    """The same in plain autograd ops, one sample at a time (what the tests compare against)."""
    src = x if x_adapter is None else x_adapter
    rows = []
    for i in range(x.shape[0]):
        a_i = a[i] if _per_sample(a) else a
        b_i = b[i] if _per_sample(b) else b
        rows.append(torch.nn.functional.linear(x[i], weight, bias) + scaling * (src[i] @ a_i.T) @ b_i.T)
    return torch.stack(rows)
