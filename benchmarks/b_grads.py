"""B's two gradients (s · G B and Gᵀ h) as one Triton pass over G against two cuBLAS GEMMs (GPU).

    python benchmarks/b_grads.py [--out DIR]

For the shapes of step_time.py's linears (r = 32 task-routed B's; MixLoRA's r = 8 rows) it times
the reference (two GEMMs and the scatter into the table) and the kernel at each tile config,
checks the kernel against the reference, and reports G's bytes over the time (the kernel's
floor is one read of G). Prints a table and writes JSON with device, versions and commit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, median, time_cuda, write_results  # noqa: E402

from asymlora.kernels import b_grads as K  # noqa: E402
from asymlora.kernels.fused import b_grads_reference  # noqa: E402

CASES = [  # (name, batch, seq, d_out, r, table)
    ("2048 q/o (d_out 2048)", 8, 1024, 2048, 32, "index"),
    ("2048 gate/up (d_out 5632)", 8, 1024, 5632, 32, "index"),
    ("4096 q/o (d_out 4096)", 4, 1024, 4096, 32, "index"),
    ("4096 gate/up (d_out 11008)", 4, 1024, 11008, 32, "index"),
    ("2048 MixLoRA rows r8", 8, 1024, 2048, 8, "rows"),
    ("2048 shared B", 8, 1024, 2048, 32, "shared"),
]
CONFIGS = [(64, 128, 4, 3, 1), (128, 64, 4, 3, 1), (128, 128, 8, 3, 1), (64, 64, 4, 4, 1), (64, 128, 4, 3, 2),
           (128, 128, 8, 3, 2), (128, 64, 4, 4, 2), (64, 256, 8, 3, 1), (256, 64, 8, 3, 1)]


def operands(batch, seq, d_out, r, table, g):
    grad = torch.randn(batch, seq, d_out, device="cuda", dtype=torch.bfloat16, generator=g)
    h_all = torch.randn(batch, seq, 3 * r, device="cuda", dtype=torch.bfloat16, generator=g)
    h = h_all[..., r:2 * r]  # a member's block of the group's columns, as the op passes it
    if table == "index":
        params = torch.randn(3, d_out, r, device="cuda", generator=g) * 0.02
        index = torch.arange(batch, device="cuda") % 3
        b = params.index_select(0, index).to(torch.bfloat16)
    elif table == "rows":
        params = torch.randn(32, d_out, device="cuda", generator=g) * 0.02
        index = torch.stack([torch.randperm(32, device="cuda", generator=g)[:r] for _ in range(batch)])
        b = params.index_select(0, index.reshape(-1)).to(torch.bfloat16).view(batch, r, d_out).transpose(1, 2)
    else:
        params, index = torch.randn(d_out, r, device="cuda", generator=g) * 0.02, None
        b = params.to(torch.bfloat16)
    return grad, b, h, list(params.shape), index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="b_grads")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, payload = [], {"environment": environment(), "cases": []}
    for name, batch, seq, d_out, r, table in CASES:
        grad, b, h, shape, index = operands(batch, seq, d_out, r, table, g)
        ref = lambda: b_grads_reference(grad, b, h, 0.5, shape, index)  # noqa: E731
        gh_ref, db_ref = ref()
        ref_ms = median(time_cuda(ref, warmup=3, repeat=args.repeat))
        gbytes = grad.numel() * grad.element_size() / 1e9
        entry = {"case": name, "shape": [batch, seq, d_out, r], "table": table, "reference_ms": ref_ms, "configs": []}
        for config in CONFIGS:
            K.CONFIG = config
            try:
                gh, db = K.b_grads(grad, b, h, 0.5, shape, index)
                err_gh = ((gh.float() - gh_ref.float()).abs().max() / gh_ref.float().abs().max()).item()
                err_db = ((db - db_ref).abs().max() / db_ref.abs().max()).item()
                ms = median(time_cuda(lambda: K.b_grads(grad, b, h, 0.5, shape, index), warmup=3, repeat=args.repeat))
                entry["configs"].append({"config": config, "ms": ms, "gb_per_s": gbytes / ms * 1e3,
                                         "rel_err_gh": err_gh, "rel_err_db": err_db})
            except Exception as err:  # a config that does not compile is reported
                entry["configs"].append({"config": config, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        K.CONFIG = None
        ok = [c for c in entry["configs"] if "ms" in c]
        best = min(ok, key=lambda c: c["ms"]) if ok else None
        entry["best"] = best
        payload["cases"].append(entry)
        rows.append(f"| {name} | {ref_ms * 1e3:.0f} | {gbytes / ref_ms * 1e3:.0f} | "
                    + (f"{best['ms'] * 1e3:.0f} | {best['gb_per_s']:.0f} | {ref_ms / best['ms']:.2f} | {best['config']} | "
                       f"{max(best['rel_err_gh'], best['rel_err_db']):.1e} |" if best else "failed | | | | |"))
        print(rows[-1], flush=True)
        for c in entry["configs"]:
            print("   ", c, flush=True)
        write_results(args.name, payload, args.out)
    print("| case | reference µs | G GB/s (ref) | kernel µs | G GB/s | speed-up | config | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
