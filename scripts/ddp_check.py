"""Run `asymlora train` and record, per optimizer step, the gradients the optimizer is about to apply.

    torchrun --nproc_per_node 2 scripts/ddp_check.py CONFIG OUT [--set key=value ...]
    accelerate launch --num_processes 2 --cpu scripts/ddp_check.py CONFIG OUT
    python scripts/ddp_check.py CONFIG OUT                       # one process, for comparison
    ... [--resume] [--fsdp2-on-cpu] [--nan-at STEP --nan-rank R]

Writes ``OUT/grads-rank{R}.pt``: a list over optimizer steps of ``{parameter name: gradient}``
(after DDP's all-reduce and clipping), and ``OUT/batches-rank{R}.json``: per forward, the sample
ids and whether the micro-batch held an image. tests/distributed compares the ranks with each
other and with one process on the same global batch; on GPUs it checks a real launch the same way.

``--nan-at STEP --nan-rank R`` makes process R's loss NaN at optimizer step STEP (1-based), to
check that every process stops with the same error instead of waiting for the others.

``--fsdp2-on-cpu`` replaces accelerate's ``prepare`` by torch's ``fully_shard`` (each decoder layer,
then the whole model), because accelerate runs FSDP on GPUs only: it exercises the trainer's FSDP2
paths (gathering shards into checkpoints, the reduce-scatter order) with gloo. On GPUs, launch
with ``accelerate launch --use_fsdp --fsdp_version 2 ...`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def shard_on_cpu(self, model, optimizer):
    """Stands in for ``Accelerator.prepare`` under ``--fsdp2-on-cpu``."""
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    inner = model.peft_model.base_model.model if hasattr(model, "peft_model") else model.base_model
    for layer in inner.model.language_model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:  # what accelerate does for FSDP2: the optimizer gets the DTensors
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model, optimizer


def check(config: str, out: str | Path, sets: list[str] = (), nan_at: int | None = None, nan_rank: int = 0,
          fsdp2_on_cpu: bool = False, resume: bool = False) -> int:
    """Train as `asymlora train CONFIG --set ...` does, recording into ``out``; the CLI's exit status."""
    import accelerate
    from torch.distributed.tensor import DTensor

    from asymlora.adapters.inject import AdapterModel
    from asymlora.cli import main as cli_main

    rank = int(os.environ.get("RANK", "0"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps: list[dict[str, torch.Tensor | None]] = []
    batches: list[dict] = []
    trained: list = []  # the model, seen at its first forward

    def whole(grad):
        return None if grad is None else (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()

    def record_grads(optimizer, *_):
        if not trained:  # a step before any forward: loading a sharded optimizer state initialises it
            return
        names = {id(p): n for n, p in trained[0].named_parameters()}  # as registered now (FSDP2 swaps them in forward)
        steps.append({names[id(p)]: whole(p.grad) for group in optimizer.param_groups for p in group["params"]})

    forward = AdapterModel.forward

    def watched_forward(self, *args, task_ids=None, **kwargs):
        if not trained:
            trained.append(self)
        outputs = forward(self, *args, task_ids=task_ids, **kwargs)
        if self.training:
            batches.append({"step": len(steps) + 1, "tasks": task_ids.tolist(), "images": "pixel_values" in kwargs})
            if nan_at is not None and rank == nan_rank and len(steps) + 1 == nan_at:
                outputs.loss = outputs.loss * float("nan")
        return outputs

    AdapterModel.forward = watched_forward
    handle = register_optimizer_step_pre_hook(record_grads)
    prepare = accelerate.Accelerator.prepare
    if fsdp2_on_cpu:
        accelerate.Accelerator.prepare = shard_on_cpu
    try:
        return cli_main(["train", str(config), *[f"--set={s}" for s in sets], *(["--resume"] if resume else [])])
    finally:
        handle.remove()
        AdapterModel.forward = forward
        accelerate.Accelerator.prepare = prepare
        torch.save(steps, out / f"grads-rank{rank}.pt")
        (out / f"batches-rank{rank}.json").write_text(json.dumps(batches))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--nan-at", type=int)
    parser.add_argument("--nan-rank", type=int, default=0)
    parser.add_argument("--fsdp2-on-cpu", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    return check(args.config, args.out, args.set, args.nan_at, args.nan_rank, args.fsdp2_on_cpu, args.resume)


if __name__ == "__main__":
    sys.exit(main())
