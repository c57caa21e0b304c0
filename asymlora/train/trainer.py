"""The training loop: a mixture of tasks, one adapter, router losses, exact resume.

Built on accelerate rather than the transformers Trainer, because exact resume and atomic,
verified checkpoints need control of what a checkpoint holds (the sampler's epoch and position,
every RNG, the adapter alone rather than the whole model) and of when it is written; the
Trainer hides both. accelerate still provides DDP / FSDP, autocast and gradient accumulation;
what several processes need besides (CPU process groups, parameters a step leaves unused, agreeing
on a failure) is in distributed.py.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``batch_size`` samples.
The loss is ``outputs.loss`` of the adapter model: language-modelling cross-entropy plus
``model.auxiliary_loss()`` (the router losses, asymlora/adapters/inject.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..adapters.inject import AdapterModel, get_model
from ..data import DataCollator, Mixture
from .checkpoint import load_latest_checkpoint, load_state, save_checkpoint
from .config import RunConfig, adapter_config
from .distributed import (UnusedParameterGuard, accelerator_kwargs, any_process, check_fsdp_units, check_fsdp_version,
                          check_launch, full_optimizer_state, full_tensors, is_sharded, load_full_optimizer_state,
                          prepare_sharded)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what to do."""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    data_summary: str = ""
    resumed_from: str | None = None
    trainable_parameters: int = 0
    mean_step_time_s: float = 0.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def per_task_token_losses(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int):
    """Sum of token cross-entropies and token counts per task ``(num_tasks,)``, next-token shifted.

    Only the labelled positions are upcast to float32, so the extra memory is a fraction of the
    logits, not a float32 copy of all of them (32k vocabulary x 2048 tokens x 16 samples = 4 GB).
    """
    with torch.no_grad():
        shift_labels = labels[:, 1:].to(logits.device)
        valid = shift_labels != -100
        rows = valid.nonzero(as_tuple=True)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1][rows].float(), shift_labels[rows], reduction="none")
        per_sample = torch.zeros(labels.shape[0], device=logits.device).index_add_(0, rows[0], ce)
        counts = valid.float().sum(1)
        ids = task_ids.to(logits.device)
        sums = torch.zeros(num_tasks, device=logits.device).index_add_(0, ids, per_sample)
        tokens = torch.zeros(num_tasks, device=logits.device).index_add_(0, ids, counts)
    return sums.cpu(), tokens.cpu()


def summarise_router_stats(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean entropy over layers and, for N-expert routers, the mean usage of each expert."""
    if not stats:
        return {}
    out = {"router/entropy": float(torch.stack([s["entropy"] for s in stats.values()]).mean())}
    usages = [s["usage"] for k, s in stats.items() if ":" not in k]
    if usages:
        for i, u in enumerate(torch.stack(usages).mean(0).tolist()):
            out[f"router/usage_expert_{i}"] = u
    else:  # MixLoRA: how concentrated factor selection is (1 / E = uniform)
        usage = torch.stack([s["usage"] for s in stats.values()])
        out["router/max_factor_share"] = float((usage / usage.sum(-1, keepdim=True)).max(-1).values.mean())
    return out


def load_adapter_state(model, folder: Path) -> None:
    """Load the adapter tensors saved in ``folder`` into ``model`` (ours or PEFT LoRA)."""
    if isinstance(model, AdapterModel):
        model.load_adapter_weights(folder)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model.peft_model, load_file(str(folder / "adapter_model.safetensors")))


def build(config: RunConfig, task_names: list[str] | None = None):
    """Model, processor, mixture and adapter model as the config describes."""
    from ..models import load_model

    model, processor = load_model(config.model.name_or_path, dtype=config.model.dtype)
    model.config._name_or_path = config.model.name_or_path  # recorded in the adapter's config (PEFT's field)
    mixture = Mixture.from_dict(config.data, task_names=task_names)
    adapter_cfg = adapter_config(config, mixture.task_names)
    if not hasattr(adapter_cfg, "peft_type"):
        adapter_cfg.base_model_name_or_path = config.model.name_or_path
    if hasattr(adapter_cfg, "peft_type"):  # PEFT LoRA: keep only modules_to_save the model has
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        adapter_cfg.modules_to_save = [m for m in (adapter_cfg.modules_to_save or []) if m in names] or None
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapted = get_model(model, adapter_cfg)
    return adapted, processor, mixture


def _param_groups(model, config: RunConfig) -> list[dict[str, Any]]:
    t = config.train
    projector_lr = t.projector_learning_rate or t.learning_rate
    adapter, projector = [], []
    save_names = set(getattr(model, "modules_to_save", None) or [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_saved = any(s in name for s in save_names) or "modules_to_save" in name
        (projector if in_saved else adapter).append(p)
    groups = [{"params": adapter, "lr": t.learning_rate, "weight_decay": t.weight_decay}]
    if projector:
        groups.append({"params": projector, "lr": projector_lr, "weight_decay": t.weight_decay})
    return groups


def _batches_of_epoch(mixture: Mixture, epoch: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    sampler = mixture.sampler(rank=rank, world_size=world)
    indices = sampler.indices(epoch)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def train(config: RunConfig, resume: bool = False, on_log: Callable[[dict[str, Any]], None] | None = None,
          on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train the adapter the config describes; ``on_log(record)`` gets every log record,
    ``on_step(step, max_steps)`` every finished optimizer step (the CLI draws its progress bar)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, gather_object

    t = config.train
    out_dir = Path(t.output_dir)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
                              **accelerator_kwargs())
    check_launch(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    log = on_log if (on_log and accelerator.is_main_process) else None

    # The main process picks the checkpoint (the newest whose files match its manifest and whose
    # state loads); every process then resumes from that one.
    resume_folder, state = None, None
    if resume:
        found = [None, []]
        if accelerator.is_main_process:
            folder, state, problems = load_latest_checkpoint(out_dir)
            found = [str(folder) if folder else None, problems]
        if world > 1:
            broadcast_object_list(found)
        for problem in found[1]:
            if log:
                log({"warning": problem})
        resume_folder = Path(found[0]) if found[0] else None
        if resume_folder is not None and state is None:
            state = load_state(resume_folder)
        if resume_folder is None and log:
            log({"warning": f"--resume: no valid checkpoint under {out_dir / 'checkpoints'}; starting from step 0"})
    task_names = None
    if resume_folder is not None:
        task_names = json.loads((resume_folder / "task_names.json").read_text())

    set_seed(t.seed)
    model, processor, mixture = build(config, task_names)
    num_tasks = len(mixture.task_names)
    train_set, val_set = mixture.datasets(processor)
    collator = DataCollator.from_processor(processor)
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=t.learning_rate)
    from transformers import get_scheduler

    warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * t.max_steps)
    scheduler = get_scheduler(t.lr_scheduler if t.lr_scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=warmup, num_training_steps=t.max_steps)

    step, epoch, position = 0, 0, 0
    if resume_folder is not None:
        load_adapter_state(model, resume_folder)
        if not state.get("optimizer_by_name"):
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        by_rank = state.get("rng_by_rank")
        if by_rank and len(by_rank) != world and log:
            log({"warning": f"{resume_folder} was written by {len(by_rank)} processes, resumed on {world}: "
                            "the data order and the random streams differ from an uninterrupted run"})
        set_rng_state(by_rank[rank] if by_rank and len(by_rank) == world else state["rng"])
    check_fsdp_version(accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    sharded = is_sharded(unwrapped)  # FSDP2: checkpoints gather the shards
    if sharded:
        check_fsdp_units(unwrapped, text_only_samples=any(not sample.has_images for sample in mixture.train))
        prepare_sharded(unwrapped)
    if resume_folder is not None:
        written_sharded = bool(state.get("optimizer_by_name"))
        if written_sharded != sharded:
            raise TrainingError(f"{resume_folder} was written {'under' if written_sharded else 'without'} FSDP2: "
                                "resume it the same way")
        if sharded:
            load_full_optimizer_state(model, optimizer, state["optimizer"])
    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    guard = UnusedParameterGuard(unwrapped)  # outputs.loss touches what a step left unused

    writer = None
    if t.tensorboard and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")

    def micro_batches() -> Iterator[tuple[int, int, dict[str, Any]]]:
        nonlocal epoch, position
        while True:
            batches = _batches_of_epoch(mixture, epoch, t.batch_size, rank, world)
            # Its own generator: creating a loader draws a seed, which must not shift the global
            # RNG (dropout) between an uninterrupted run and a resumed one.
            loader = DataLoader(train_set, batch_sampler=batches[position:], collate_fn=collator,
                                num_workers=t.num_workers, generator=torch.Generator().manual_seed(t.seed + epoch))
            for batch in loader:
                position += 1
                yield batch
            epoch, position = epoch + 1, 0

    def adapter_tensors() -> dict[str, torch.Tensor] | None:
        """Under FSDP2 the adapter's whole tensors, gathered by every process; else None (saved as is)."""
        if not sharded:
            return None
        if isinstance(unwrapped, AdapterModel):
            return full_tensors(unwrapped.adapter_state_dict())
        return full_tensors({n: p for n, p in unwrapped.peft_model.named_parameters() if p.requires_grad})

    def checkpoint(at_step: int) -> Path:
        """Written by the main process (DDP keeps the replicas equal; FSDP2's shards are gathered
        first), with every process's RNG state; every process returns the folder's path."""
        rngs = gather_object([rng_state()]) if world > 1 else None
        tensors = adapter_tensors()
        optimizer_state = full_optimizer_state(model, optimizer) if sharded else None
        if accelerator.is_main_process:
            def write(folder: Path) -> None:
                unwrapped.save_pretrained(folder, state_dict=tensors)
                (folder / "task_names.json").write_text(json.dumps(mixture.task_names))

            state = {"optimizer": optimizer_state if sharded else optimizer.state_dict(), "optimizer_by_name": sharded,
                     "scheduler": scheduler.state_dict(), "step": at_step, "epoch": epoch, "position": position,
                     "rng": rng_state()}
            if rngs is not None:
                state["rng_by_rank"] = rngs
            save_checkpoint(out_dir, at_step, write, state, keep=t.save_total_limit)
        return out_dir / "checkpoints" / f"step-{at_step:06d}"

    history: list[dict[str, Any]] = []
    stream = micro_batches()
    window = {"loss": 0.0, "n": 0, "task_sum": torch.zeros(num_tasks), "task_tok": torch.zeros(num_tasks), "tokens": 0}
    last_checkpoint = str(resume_folder) if resume_folder else None
    stop_at = min(t.max_steps, t.stop_after_steps or t.max_steps)
    step_times = []
    model.train()
    while step < stop_at:
        started = time.perf_counter()
        collect = isinstance(unwrapped, AdapterModel) and t.router_stats_steps and (step + 1) % t.router_stats_steps == 0
        router = {}
        for micro in range(t.gradient_accumulation_steps):
            batch = next(stream)
            mixture.summary.add_events(batch.pop("data_events"))
            sample_ids = batch.pop("sample_ids")
            task_ids = batch.pop("task_ids")
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with accelerator.accumulate(model), accelerator.autocast():
                if collect and micro == 0:
                    with unwrapped.collect_routing(stats=True):
                        outputs = model(**batch, task_ids=task_ids.to(accelerator.device))
                    router = summarise_router_stats(unwrapped.routing_context.stats)
                else:
                    outputs = model(**batch, task_ids=task_ids.to(accelerator.device))
                loss = outputs.loss
                if any_process(accelerator, not bool(torch.isfinite(loss.detach()))):
                    raise _non_finite_loss(accelerator, loss, step + 1, micro, sample_ids, last_checkpoint)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums, toks = per_task_token_losses(outputs.logits, batch["labels"], task_ids, num_tasks)
            window["task_sum"] += sums
            window["task_tok"] += toks
            window["loss"] += float(loss.detach())
            window["n"] += 1
            window["tokens"] += int(batch["attention_mask"].sum())
        scheduler.step()
        step += 1
        step_times.append(time.perf_counter() - started)
        if on_step:
            on_step(step, t.max_steps)
        if collect or step % t.logging_steps == 0 or step == stop_at:
            if world > 1:  # the record describes every process's samples, not the main one's
                totals = accelerator.reduce(torch.cat([torch.tensor([window["loss"], window["n"]]), window["task_sum"],
                                                       window["task_tok"]]).to(accelerator.device), reduction="sum").cpu()
                window.update(loss=float(totals[0]), n=int(totals[1]), task_sum=totals[2:2 + num_tasks],
                              task_tok=totals[2 + num_tasks:])
            record = {"step": step, "loss": window["loss"] / max(window["n"], 1),
                      "lr": scheduler.get_last_lr()[0], "step_time_s": float(np.mean(step_times[-t.logging_steps:]))}
            record.update({k: v for k, v in unwrapped.last_loss_parts.items() if k != "lm_loss"})
            for i, name in enumerate(mixture.task_names):
                if window["task_tok"][i] > 0:
                    record[f"loss/{name}"] = float(window["task_sum"][i] / window["task_tok"][i])
            record.update(router)
            if step % t.logging_steps == 0 or step == stop_at:
                window = {"loss": 0.0, "n": 0, "task_sum": torch.zeros(num_tasks), "task_tok": torch.zeros(num_tasks), "tokens": 0}
            history.append(record)
            if writer:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
            if log:
                log(record)
        if t.eval_steps and val_set is not None and step % t.eval_steps == 0:
            record = {"step": step, "val_loss": evaluate_loss(model, val_set, collator, t.batch_size, accelerator)}
            history.append(record)
            if writer:
                writer.add_scalar("val/loss", record["val_loss"], step)
            if log:
                log(record)
        if step % t.save_steps == 0 or step == stop_at:
            last_checkpoint = str(checkpoint(step))
        accelerator.wait_for_everyone()

    adapter_dir = out_dir / "adapter"
    tensors = adapter_tensors() if step >= t.max_steps else None
    if accelerator.is_main_process and step >= t.max_steps:
        unwrapped.save_pretrained(adapter_dir, state_dict=tensors)
        (out_dir / "data_summary.json").write_text(json.dumps(mixture.summary.to_dict(), indent=2) + "\n")
    if writer:
        writer.close()
    guard.remove()
    return TrainResult(output_dir=out_dir, adapter_dir=adapter_dir, steps=step, history=history,
                       data_summary=mixture.summary.format(), resumed_from=str(resume_folder) if resume_folder else None,
                       trainable_parameters=trainable, mean_step_time_s=float(np.median(step_times)) if step_times else 0.0)


def _non_finite_loss(accelerator, loss: torch.Tensor, step: int, micro: int, sample_ids: list[str],
                     last_checkpoint: str | None) -> TrainingError:
    """The error every process raises when any process's loss is not finite; it names the
    processes, their batches' sample ids, the step and the checkpoint to resume from."""
    from accelerate.utils import gather_object

    mine = [(accelerator.process_index, float(loss.detach()), list(sample_ids))]
    reports = gather_object(mine) if accelerator.num_processes > 1 else mine
    bad = [(r, value, ids) for r, value, ids in reports if not math.isfinite(value)]
    where = "; ".join(f"{'rank ' + str(r) + ': ' if accelerator.num_processes > 1 else ''}loss {value}, "
                      f"samples {ids}" for r, value, ids in bad)
    return TrainingError(
        f"non-finite loss at step {step}, micro-batch {micro}: {where}; last good checkpoint: "
        f"{last_checkpoint or 'none (nothing saved yet)'}. Lower train.learning_rate or check these samples, "
        "then resume with --resume."
    )


@torch.no_grad()
def evaluate_loss(model, dataset, collator, batch_size: int, accelerator) -> float:
    """Mean token cross-entropy (without router losses) over a validation set."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0.0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in loader:
        batch.pop("data_events")
        batch.pop("sample_ids")
        task_ids = batch.pop("task_ids")
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with accelerator.autocast():
            logits = model(**batch, task_ids=task_ids.to(accelerator.device)).logits
        sums, toks = per_task_token_losses(logits, batch["labels"], task_ids, int(task_ids.max()) + 1)
        total += float(sums.sum())
        tokens += float(toks.sum())
    model.train(was_training)
    return total / max(tokens, 1.0)
