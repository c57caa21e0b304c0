"""Probe (GPU): can a GEMM of our own add the low-rank update inside the frozen GEMM faster than
cuBLAS does it in two GEMMs? Issue 6's one unmet goal (AsymLoRA at hidden 2048) hangs on this.

    python benchmarks/fused_gemm_probe.py [--out DIR] [--name NAME]

The forward of one task-routed AsymLoRA linear at the 2048 benchmark's shapes (8 samples × 1024
tokens, r = 32, each sample its expert's B):

    y = x Wᵀ + h B_sᵀ        x: (M, K), W: (N, K), h = s · x Aᵀ: (M, r), B_s: (N, r) for sample s

- ``floor``: ``x Wᵀ`` alone, cuBLAS (what the frozen model runs);
- ``cublas``: what the fused op runs today, ``u = h B_sᵀ`` per sample (bmm) written once, then the
  frozen GEMM adding itself onto it (``addmm_``, beta = 1): the update is written and read back;
- ``triton``: one Triton kernel, two K loops into one accumulator (``x Wᵀ`` then ``h B_sᵀ``): no
  update in memory at all; with pointer loads and with TMA tensor descriptors, each over a sweep
  of tile shapes, and the same kernels without the low-rank loop (``triton_plain``: how far
  Triton's own GEMM is from cuBLAS's at this shape).

The fused kernel wins only where ``triton`` beats ``cublas``; it cannot beat ``floor`` by more
than noise. Each is timed by ``triton.testing.do_bench`` (median, L2 flushed between calls) and
checked against a float32 reference (‖y − ref‖ / ‖ref‖, the output poisoned with NaN first).
Writes JSON (device, versions, commit) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_results  # noqa: E402

SAMPLES, ROWS, RANK = 8, 1024, 32
SHAPES = {  # (N, K) of a layer's linears at hidden 2048 (intermediate 5632)
    "q/k/v/o (2048 x 2048)": (2048, 2048),
    "gate/up (5632 x 2048)": (5632, 2048),
    "down (2048 x 5632)": (2048, 5632),
}
# (BM, BN, BK, stages, warps, GROUP_M): tiles that fill an H100 at these shapes
CONFIGS = [(128, 256, 64, 3, 8, 8), (128, 256, 64, 4, 8, 8), (256, 128, 64, 3, 8, 8),
           (128, 128, 64, 4, 4, 8), (128, 128, 64, 5, 8, 8), (128, 128, 128, 3, 8, 8)]


@triton.jit
def _tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (GROUP_M row tiles share their column tiles while in L2)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _gemm_lowrank_ptr(x_ptr, w_ptr, h_ptr, b_ptr, y_ptr, M, N, K, rows_per_sample,
                      stride_xm, stride_wn, stride_hm, stride_bs, stride_bn, stride_ym,
                      R: tl.constexpr, LOWRANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # a (BK, BN) tile of Wᵀ
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K, BK):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BK
        w_ptrs += BK
    if LOWRANK:  # the second K loop: one step of K = r, this tile's sample's B
        sample = (pid_m * BM) // rows_per_sample
        offs_r = tl.arange(0, R)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :])
        b = tl.load(b_ptr + sample * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None])
        acc = tl.dot(h, b, acc)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _gemm_lowrank_tma(x_desc, w_desc, h_desc, b_desc, y_desc, M, N, K, rows_per_sample,
                      LOWRANK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        acc = tl.dot(x_desc.load([pid_m * BM, k]), w_desc.load([pid_n * BN, k]).T, acc)
    if LOWRANK:
        sample = (pid_m * BM) // rows_per_sample
        h = h_desc.load([pid_m * BM, 0])
        b = b_desc.load([sample * N + pid_n * BN, 0])  # B as (samples · N, r)
        acc = tl.dot(h, b.T, acc)
    y_desc.store([pid_m * BM, pid_n * BN], acc.to(y_desc.dtype))


def _check(x, w, h, b, rows_per_sample, config):
    (m, k), n = x.shape, w.shape[0]
    bm, bn, bk = config[:3]
    if m % bm or n % bn or k % bk or rows_per_sample % bm:
        raise ValueError(f"tile {bm}x{bn}x{bk} does not divide M={m}, N={n}, K={k}, rows a sample={rows_per_sample}")
    if any(t.stride(-1) != 1 for t in (x, w, h, b)):
        raise ValueError("x, W, h and B must have unit stride in their last dimension")
    if h.shape != (m, b.shape[-1]) or b.shape[1] != n or b.shape[0] * rows_per_sample != m:
        raise ValueError(f"h {tuple(h.shape)} / B {tuple(b.shape)} do not match x {tuple(x.shape)}, W {tuple(w.shape)}")


def fused_launcher(x, w, h, b, rows_per_sample, config, lowrank=True, tma=False, out=None):
    """A zero-argument launch of ``y = x Wᵀ + h B_sᵀ`` (sample s owns rows ``[s·rows_per_sample,
    (s+1)·rows_per_sample)``) in one kernel, writing ``out`` (or a new tensor, returned by each call).
    Checks and TMA descriptors are built here, once: a timed call is the kernel launch alone, as
    the cuBLAS side's is."""
    _check(x, w, h, b, rows_per_sample, config)
    (m, k), n = x.shape, w.shape[0]
    bm, bn, bk, stages, warps, group_m = config
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    launch = dict(LOWRANK=lowrank, BM=bm, BN=bn, BK=bk, GROUP_M=group_m, num_stages=stages, num_warps=warps)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        r = b.shape[-1]
        args = (TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
                TensorDescriptor.from_tensor(h, [bm, r]), TensorDescriptor.from_tensor(b.reshape(-1, r), [bn, r]),
                TensorDescriptor.from_tensor(y, [bm, bn]), m, n, k, rows_per_sample)
        kernel = _gemm_lowrank_tma[grid]
    else:
        args = (x, w, h, b, y, m, n, k, rows_per_sample, x.stride(0), w.stride(0), h.stride(0),
                b.stride(0), b.stride(1), y.stride(0))
        launch["R"] = b.shape[-1]
        kernel = _gemm_lowrank_ptr[grid]

    def run():
        kernel(*args, **launch)
        return y

    return run


def fused_linear(x, w, h, b, rows_per_sample, config, lowrank=True, tma=False, out=None):
    """``x Wᵀ + h B_sᵀ`` in one kernel (:func:`fused_launcher`, launched once)."""
    return fused_launcher(x, w, h, b, rows_per_sample, config, lowrank, tma, out)()


def cublas_linear(x, w, h, b, rows_per_sample):
    """Today's fused op: the update written by one bmm, the frozen GEMM accumulating onto it."""
    samples = b.shape[0]
    u = torch.bmm(h.view(samples, rows_per_sample, -1), b.transpose(1, 2))
    return u.view(x.shape[0], -1).addmm_(x, w.t())


def reference(x, w, h, b, rows_per_sample, lowrank=True):
    y = x.float() @ w.float().t()
    if lowrank:
        samples = b.shape[0]
        y = y + torch.bmm(h.float().view(samples, rows_per_sample, -1), b.float().transpose(1, 2)).view(y.shape)
    return y


def rel_error(y, ref) -> float:
    return float("nan") if not torch.isfinite(y).all() else ((y.float() - ref).norm() / ref.norm()).item()


def inputs(n: int, k: int, samples: int = SAMPLES, rows: int = ROWS, r: int = RANK, device="cuda",
           dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(samples * rows, k, device=device, dtype=dtype, generator=g)
    w = (torch.randn(n, k, device=device, dtype=dtype, generator=g) / k ** 0.5)
    h = torch.randn(samples * rows, r, device=device, dtype=dtype, generator=g)
    b = torch.randn(samples, n, r, device=device, dtype=dtype, generator=g) * 0.1
    return x, w, h, b


def main(argv: list[str] | None = None) -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="fused_gemm_probe")
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="sweep only the first N tile configs")
    args = parser.parse_args(argv)
    payload = {"environment": {**environment(), "triton": triton.__version__}, "results": {}}
    lines = ["| linear (N x K), M = 8192 | floor (cuBLAS x Wᵀ) µs | cublas (bmm + addmm_) µs | "
             "triton fused, best µs (config, kind) | triton plain, best µs | fused / cublas | plain / floor |",
             "|---|---|---|---|---|---|---|"]
    for label, (n, k) in SHAPES.items():
        x, w, h, b = inputs(n, k, seed=n + k)
        ref, ref_plain = reference(x, w, h, b, ROWS), reference(x, w, h, b, ROWS, lowrank=False)
        entry = {"floor_us": 1e3 * do_bench(lambda: x @ w.t(), return_mode="median"),
                 "cublas_us": 1e3 * do_bench(lambda: cublas_linear(x, w, h, b, ROWS), return_mode="median"),
                 "cublas_error": rel_error(cublas_linear(x, w, h, b, ROWS), ref),
                 "floor_error": rel_error(x @ w.t(), ref_plain), "triton": []}
        for tma in (False, True):
            for config in CONFIGS[:args.configs]:
                for lowrank in (True, False):
                    row = {"config": config, "tma": tma, "lowrank": lowrank}
                    try:
                        y = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype, device=x.device)
                        run = fused_launcher(x, w, h, b, ROWS, config, lowrank, tma, out=y)
                        run()
                        torch.cuda.synchronize()
                        row["error"] = rel_error(y, ref if lowrank else ref_plain)
                        row["us"] = 1e3 * do_bench(run, return_mode="median")
                    except Exception as err:  # a config that does not compile or fit is reported
                        row["failed"] = f"{type(err).__name__}: {str(err)[:200]}"
                    entry["triton"].append(row)
                    print(label, row, flush=True)
        ok = [r for r in entry["triton"] if "us" in r and r["error"] < 1e-2]
        fused = min((r for r in ok if r["lowrank"]), key=lambda r: r["us"], default=None)
        plain = min((r for r in ok if not r["lowrank"]), key=lambda r: r["us"], default=None)
        entry["best_fused"], entry["best_plain"] = fused, plain
        payload["results"][label] = entry
        write_results(args.name, payload, args.out)  # a call cut short still leaves its shapes
        if fused and plain:
            lines.append(f"| {label} | {entry['floor_us']:.1f} | {entry['cublas_us']:.1f} | {fused['us']:.1f} "
                         f"({'x'.join(map(str, fused['config'][:3]))}, {'TMA' if fused['tma'] else 'pointers'}) | "
                         f"{plain['us']:.1f} | {fused['us'] / entry['cublas_us']:.3f} | "
                         f"{plain['us'] / entry['floor_us']:.3f} |")
        print(f"{label}: errors cublas {entry['cublas_error']:.2e}, floor {entry['floor_error']:.2e}, "
              f"fused {fused['error'] if fused else float('nan'):.2e}", flush=True)
    path = write_results(args.name, payload, args.out)
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
