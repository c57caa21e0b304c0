"""B's two gradients in one pass over the output gradient (Triton, CUDA).

In a routed linear's backward, B's side needs two products of the output gradient G
``(batch, seq, d_out)``, the largest tensor the adapter touches:

    gh = s · G B        (batch, seq, r): what flows on to A and to the input
    dB = Gᵀ h           (d_out, r) per sample, summed into B's parameter table

As two cuBLAS GEMMs, G is read twice, and each read is a pass over an
activation-sized tensor (the GEMMs are memory-bound: r = 32). Here each program takes a block of
one sample's rows and walks d_out once; from each tile of G it computes its share of both
products: gh's rows are summed over d_out in registers, and the tile's share of dB is added with
float32 atomics straight into the gradient of the parameter table, at the row that sample's
routing names (its expert for AsymLoRA / LoRA-MoE task routing, each column's factor for
MixLoRA, the one matrix for a shared B). No per-sample gradient is written, and no index_add
follows.

Importing this module needs no Triton: :func:`available` says whether the kernel can run on a
given tensor (CUDA, half precision, Triton installed); elsewhere callers take the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Tile sizes (rows of G, columns of G, warps, pipeline stages, programs along d_out): chosen on an
# H100 with benchmarks/b_grads.py. Tests and the benchmark may set CONFIG to try others.
DEFAULT_CONFIG = (64, 128, 4, 3, 1)
CONFIG: tuple[int, int, int, int, int] | None = None


def available(grad: Tensor, b: Tensor, h: Tensor) -> bool:
    """Whether :func:`b_grads` runs the kernel for these operands (else use the reference)."""
    return (triton is not None and grad.is_cuda and grad.dtype in (torch.bfloat16, torch.float16)
            and b.dtype == grad.dtype and h.dtype == grad.dtype and grad.dim() == 3 and h.shape[-1] <= 128)


def _column_offsets(b: Tensor, table_shape: list[int], index: Tensor | None) -> tuple[Tensor, int]:
    """Where each sample's column j of dB starts in the (contiguous, float32) table gradient, as
    element offsets ``(batch or 1, r)``, and the stride along d_out."""
    r = b.shape[-1]
    cols = torch.arange(r, device=b.device)
    if index is None:
        if len(table_shape) == 2:  # one shared B (d_out, r)
            return cols.unsqueeze(0), r
        batch, d_out = table_shape[0], table_shape[1]  # per-sample B's (batch, d_out, r)
        return torch.arange(batch, device=b.device).unsqueeze(1) * (d_out * r) + cols, r
    if index.dim() == 1:  # a table of matrices (N, d_out, r): the sample's expert
        d_out = table_shape[1]
        return index.to(torch.int64).unsqueeze(1) * (d_out * r) + cols, r
    d_out = table_shape[1]  # a table of rows (E, d_out): column j of sample b is row index[b, j]
    return index.to(torch.int64) * d_out, 1


if triton is not None:

    @triton.jit
    def _b_grads_kernel(g_ptr, b_ptr, h_ptr, gh_ptr, db_ptr, off_ptr,
                        S, D, R, blocks_per_sample,
                        s_gb, s_gs, s_gd, s_bb, s_bd, s_br, s_hb, s_hs, s_hr,
                        s_ghb, s_ghs, s_ghr, s_dbd, s_offb, scaling,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                        D_SPLIT: tl.constexpr):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        sample = (pid // blocks_per_sample).to(tl.int64)
        offs_s = (pid % blocks_per_sample) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_r = tl.arange(0, BLOCK_R)
        mask_s = offs_s < S
        mask_r = offs_r < R
        rows_s = offs_s.to(tl.int64)
        h = tl.load(h_ptr + sample * s_hb + rows_s[:, None] * s_hs + offs_r[None, :] * s_hr,
                    mask=mask_s[:, None] & mask_r[None, :], other=0.0)
        db_cols = tl.load(off_ptr + sample * s_offb + offs_r, mask=mask_r, other=0)
        g_rows = g_ptr + sample * s_gb + rows_s[:, None] * s_gs
        b_base = b_ptr + sample * s_bb
        acc = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
        steps = tl.cdiv(tl.cdiv(D, BLOCK_D), D_SPLIT)  # this program's share of d_out, in tiles
        d_lo = split * steps * BLOCK_D
        for step in range(steps):
            offs_d = d_lo + step * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            g = tl.load(g_rows + offs_d[None, :] * s_gd, mask=mask_s[:, None] & mask_d[None, :], other=0.0)
            b = tl.load(b_base + offs_d[:, None] * s_bd + offs_r[None, :] * s_br,
                        mask=mask_d[:, None] & mask_r[None, :], other=0.0)
            acc = tl.dot(g, b, acc)
            part = tl.dot(tl.trans(g), h)
            tl.atomic_add(db_ptr + db_cols[None, :] + offs_d.to(tl.int64)[:, None] * s_dbd, part,
                          mask=mask_d[:, None] & mask_r[None, :], sem="relaxed")
        acc = acc * scaling
        gh_ptrs = gh_ptr + sample * s_ghb + rows_s[:, None] * s_ghs + offs_r[None, :] * s_ghr
        if D_SPLIT == 1:
            tl.store(gh_ptrs, acc.to(gh_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_r[None, :])
        else:
            tl.atomic_add(gh_ptrs, acc, mask=mask_s[:, None] & mask_r[None, :], sem="relaxed")


def _launch(kernel, grad: Tensor, b: Tensor, h: Tensor, scaling: float, table_shape: list[int],
            index: Tensor | None) -> tuple[Tensor, Tensor]:
    batch, seq, d_out = grad.shape
    r = b.shape[-1]
    block_s, block_d, warps, stages, d_split = CONFIG or DEFAULT_CONFIG
    block_r = max(16, triton.next_power_of_2(r))
    offsets, s_dbd = _column_offsets(b, table_shape, index)
    db = torch.zeros(table_shape, dtype=torch.float32, device=grad.device)
    if d_split == 1:
        gh = torch.empty(batch, seq, r, dtype=grad.dtype, device=grad.device)
    else:
        gh = torch.zeros(batch, seq, r, dtype=torch.float32, device=grad.device)
    blocks = triton.cdiv(seq, block_s)
    s_bb = b.stride(0) if b.dim() == 3 else 0
    kernel[(batch * blocks, d_split)](
        grad, b, h, gh, db, offsets, seq, d_out, r, blocks,
        grad.stride(0), grad.stride(1), grad.stride(2), s_bb, b.stride(-2), b.stride(-1),
        h.stride(0), h.stride(1), h.stride(2), gh.stride(0), gh.stride(1), gh.stride(2),
        s_dbd, offsets.stride(0) if offsets.shape[0] > 1 else 0, scaling,
        BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_R=block_r, D_SPLIT=d_split, num_warps=warps, num_stages=stages)
    return gh.to(grad.dtype), db


if triton is not None:

    @torch.library.triton_op("asymlora::b_grads", mutates_args=())
    def _b_grads_op(grad: Tensor, b: Tensor, h: Tensor, scaling: float, table_shape: list[int],
                    index: Tensor | None) -> tuple[Tensor, Tensor]:
        return _launch(torch.library.wrap_triton(_b_grads_kernel), grad, b, h, scaling, table_shape, index)


def b_grads(grad: Tensor, b: Tensor, h: Tensor, scaling: float, table_shape: list[int],
            index: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(s · G B, dB)`` with G read once; needs :func:`available`.

    grad ``(batch, seq, d_out)``; b the selected B in grad's dtype, ``(d_out, r)`` or per sample
    ``(batch, d_out, r)`` (any strides); h ``(batch, seq, r)`` (any strides, e.g. a block of the
    group's columns). ``table_shape`` and ``index`` describe B's parameter as
    :func:`asymlora.kernels.lowrank_linear` takes it: ``(d_out, r)`` or ``(batch, d_out, r)`` with
    no index, ``(N, d_out, r)`` with ``index: (batch,)``, rows ``(E, d_out)`` with ``index: (batch,
    r)``. Returns gh in grad's dtype and dB in float32 with the table's shape (summed over samples
    that share a matrix or row)."""
    return _b_grads_op(grad.contiguous(), b, h, float(scaling), [int(n) for n in table_shape], index)


def b_grads_interpreted(grad: Tensor, b: Tensor, h: Tensor, scaling: float, table_shape: list[int],
                        index: Tensor | None) -> tuple[Tensor, Tensor]:
    """The kernel called directly, without the torch op around it: with ``TRITON_INTERPRET=1``
    set before Triton is imported, it runs on the CPU (what the CPU tests do)."""
    return _launch(_b_grads_kernel, grad.contiguous(), b, h, float(scaling), [int(n) for n in table_shape], index)
