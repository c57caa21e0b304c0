"""Fast paths in plain PyTorch: every expert in one GEMM.

AsymLoRA: the gate scales the shared low-rank activation per expert, and the N B's are one
(d_out × N·r) matrix, so the whole delta is two GEMMs whatever N is. LoRA-MoE: the N A's are one
(N·r × d_in) matrix too. MixLoRA: the selection becomes a per-instance pairing matrix over the
whole pool, so no per-instance copies of factors are gathered.
"""

import torch
from torch import Tensor


def asym_lora_delta_stacked(x: Tensor, shared_a: Tensor, expert_b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    n, d_out, r = expert_b.shape
    h = x @ shared_a.T  # (batch, seq, r)
    # The scaling rides on the small gated activation, not on the (batch, seq, d_out) output.
    gated = (h.unsqueeze(-2) * (weights.to(h.dtype) * scaling).unsqueeze(-1)).flatten(-2)  # (batch, seq, N·r)
    b_cat = expert_b.permute(1, 0, 2).reshape(d_out, n * r)
    return gated @ b_cat.T


def asym_lora_delta_indexed(x: Tensor, shared_a: Tensor, expert_b: Tensor, index: Tensor, scaling: float) -> Tensor:
    """Task routing: sample b uses only B_{index[b]}: one GEMM for A, one batched GEMM for B."""
    h = (x @ shared_a.T) * scaling
    return torch.bmm(h, expert_b[index].transpose(1, 2))


def lora_moe_delta_indexed(x: Tensor, expert_a: Tensor, expert_b: Tensor, index: Tensor, scaling: float) -> Tensor:
    h = torch.bmm(x, expert_a[index].transpose(1, 2)) * scaling
    return torch.bmm(h, expert_b[index].transpose(1, 2))


def lora_moe_delta_stacked(x: Tensor, expert_a: Tensor, expert_b: Tensor, weights: Tensor, scaling: float) -> Tensor:
    n, r, d_in = expert_a.shape
    d_out = expert_b.shape[1]
    h = x @ expert_a.reshape(n * r, d_in).T  # (batch, seq, N·r)
    gated = h * (weights.to(h.dtype) * scaling).repeat_interleave(r, dim=-1)
    b_cat = expert_b.permute(1, 0, 2).reshape(d_out, n * r)
    return gated @ b_cat.T


def mix_lora_delta_pairing(
    x: Tensor, factor_a: Tensor, factor_b: Tensor, index_a: Tensor, index_b: Tensor,
    coef_a: Tensor, coef_b: Tensor, scaling: float,
) -> Tensor:
    """``((x · factor_aᵀ) · P) · factor_b`` with ``P[b, idx_a[j], idx_b[j]] = c^A_j c^B_j``."""
    batch, e = index_a.shape[0], factor_a.shape[0]
    pairing = x.new_zeros(batch, e, e, dtype=factor_a.dtype)
    values = (coef_a * coef_b * scaling).to(factor_a.dtype)
    flat = index_a * e + index_b  # (batch, r)
    pairing = pairing.view(batch, e * e).scatter_add(1, flat, values).view(batch, e, e)
    h = x @ factor_a.T  # (batch, seq, E)
    return torch.bmm(h, pairing) @ factor_b
