"""Reference deltas: the equations of the papers written as directly as possible.

Shapes: ``x: (batch, seq, d_in)``, ``weights: (batch, seq or 1, N)``; the result is
``(batch, seq, d_out)`` in the adapter parameters' dtype.
"""

import torch
from torch import Tensor


def asym_lora_delta_reference(x: Tensor, shared_a: Tensor, expert_b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    """AsymLoRA (seed 000, Eq. 3): ``s · Σ_i w_i(x) · B_i (A x)``.

    shared_a: (r, d_in); expert_b: (N, d_out, r).
    """
    h = x @ shared_a.T
    out = 0
    for i in range(expert_b.shape[0]):
        out = out + weights[..., i : i + 1].to(h.dtype) * (h @ expert_b[i].T)
    return out * scaling


def lora_moe_delta_reference(x: Tensor, expert_a: Tensor, expert_b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    """LoRA-MoE (LLaVA-MoLE): ``s · Σ_i w_i(x) · B_i A_i x``. expert_a: (N, r, d_in); expert_b: (N, d_out, r)."""
    out = 0
    for i in range(expert_a.shape[0]):
        out = out + weights[..., i : i + 1].to(x.dtype) * ((x @ expert_a[i].T) @ expert_b[i].T)
    return out * scaling


def mix_lora_delta_reference(
    x: Tensor, factor_a: Tensor, factor_b: Tensor, index_a: Tensor, index_b: Tensor,
    coef_a: Tensor, coef_b: Tensor, scaling: float,
) -> Tensor:
    """MixLoRA (seed 003, Eq. 1 with selected factors): per instance, ``A`` stacks the selected
    ``a`` rows and ``B`` the selected ``b`` rows, paired by rank position j.

    factor_a: (E, d_in); factor_b: (E, d_out); index_a, index_b, coef_a, coef_b: (batch, r).
    Computed as ``(x A_selᵀ) B_sel`` so the per-instance d_in × d_out matrix is never formed.
    """
    a_sel = factor_a[index_a] * coef_a.unsqueeze(-1).to(factor_a.dtype)  # (batch, r, d_in)
    b_sel = factor_b[index_b] * coef_b.unsqueeze(-1).to(factor_b.dtype)  # (batch, r, d_out)
    h = torch.einsum("btd,brd->btr", x, a_sel)
    return torch.einsum("btr,bro->bto", h, b_sel) * scaling
