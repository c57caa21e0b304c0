"""Delta computations of the adapter layers: a plain reference and a fast path for each.

Layers call :func:`asym_lora_delta`, :func:`lora_moe_delta` or :func:`mix_lora_delta`; the
``fast`` flag (``config.fast_path``) picks the implementation here and nowhere else. Where a layer
can run as the frozen linear plus one update (task routing, MixLoRA's selection, a soft or top-k
gate over the experts), the fast path is :func:`lowrank_linear`: both as one op (fused.py), and
:func:`lowrank_linear_group` for the linears that read the same input (q, k, v; gate, up); the
delta functions here serve the rest (float32 adapter math, inputs that are not (batch, seq, d)).
Every fast path is tested against its reference (forward and gradients) on fresh random inputs.
"""

from .fused import (LowRankMember, lowrank_linear, lowrank_linear_group, lowrank_linear_group_reference,
                    lowrank_linear_prepared, lowrank_linear_reference, routed_matrices, stack_factors,
                    write_frozen_rows)
from .reference import asym_lora_delta_reference, lora_moe_delta_reference, mix_lora_delta_reference
from .stacked import (asym_lora_delta_indexed, asym_lora_delta_stacked, lora_moe_delta_indexed,
                      lora_moe_delta_stacked, mix_lora_delta_pairing)


def asym_lora_delta(x, shared_a, expert_b, weights, scaling, fast: bool = True, index=None):
    """``s · Σ_i w_i · B_i A x``; see :func:`asym_lora_delta_reference` for shapes.

    ``index: (batch,)``, when routing sends whole samples to one expert (task routing), lets the
    fast path gather each sample's B instead of gating all N (``weights`` must be its one-hot).
    """
    if not fast:
        return asym_lora_delta_reference(x, shared_a, expert_b, weights, scaling)
    if index is not None:
        return asym_lora_delta_indexed(x, shared_a, expert_b, index, scaling)
    return asym_lora_delta_stacked(x, shared_a, expert_b, weights, scaling)


def lora_moe_delta(x, expert_a, expert_b, weights, scaling, fast: bool = True, index=None):
    """``s · Σ_i w_i · B_i A_i x``; see :func:`lora_moe_delta_reference` for shapes and ``index``."""
    if not fast:
        return lora_moe_delta_reference(x, expert_a, expert_b, weights, scaling)
    if index is not None:
        return lora_moe_delta_indexed(x, expert_a, expert_b, index, scaling)
    return lora_moe_delta_stacked(x, expert_a, expert_b, weights, scaling)


def mix_lora_delta(x, factor_a, factor_b, index_a, index_b, coef_a, coef_b, scaling, fast: bool = True):
    """``s · Σ_j c^B_j c^A_j · b_{idx_b[j]} a_{idx_a[j]}ᵀ x`` per instance; see the reference for shapes."""
    fn = mix_lora_delta_pairing if fast else mix_lora_delta_reference
    return fn(x, factor_a, factor_b, index_a, index_b, coef_a, coef_b, scaling)


__all__ = ["asym_lora_delta", "lora_moe_delta", "mix_lora_delta", "LowRankMember", "lowrank_linear",
           "lowrank_linear_group", "lowrank_linear_group_reference", "lowrank_linear_prepared", "lowrank_linear_reference",
           "routed_matrices", "stack_factors", "write_frozen_rows"]
