"""Training on several processes: DDP or FSDP2 through accelerate, launched by ``accelerate launch``
(GPUs) or ``torchrun`` (GPUs or CPU).

What the loop needs beyond what accelerate does by itself:

- **Starting the process group on CPU.** Under ``torchrun`` on a machine without CUDA, accelerate
  starts no process group unless told ``cpu=True``, and each process would silently train its own
  copy on the whole data. :func:`accelerator_kwargs` asks for CPU when the launcher started
  several processes and there is no GPU, and :func:`check_launch` refuses a run whose process
  count differs from the launcher's. (``accelerate launch --cpu --num_processes N`` starts one
  process unless it goes through mpirun: on CPU, launch with torchrun.)
- **Parameters that take no part in a step** (:class:`UnusedParameterGuard`).
- **Agreeing on a failure** (:func:`any_process`): a non-finite loss on one rank must stop every
  rank, or the others wait forever in the next all-reduce.
- **FSDP2** (parameters sharded as DTensors): checkpoints gather the adapter's tensors and the
  optimizer state whole (:func:`full_tensors`, :func:`full_optimizer_state`) so that a checkpoint
  and the final adapter are the same files as on one process; the decoder's input is made to
  require grad (:func:`prepare_sharded`) so that every rank reduce-scatters the layers in the same
  order whether or not its micro-batch had an image; units inside the image path are refused when
  the data has text-only samples (:func:`check_fsdp_units`). FSDP1 (flat parameters) is refused.

A step on N processes with ``batch_size`` b equals a single-process step on the same N·b samples
(the sampler deals every N-th sample of the epoch's list to each rank, so the global batches are
the same) when every rank's micro-batch has the same number of label tokens: each rank's loss is
the mean over its own label tokens and DDP / FSDP average the ranks' gradients, i.e. the result
is the mean of per-rank means (the convention of accelerate and the HF Trainer without
``num_items_in_batch``). tests/distributed checks it, for DDP and FSDP2, and that a stopped
multi-process run resumes to the same adapter.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) started."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def accelerator_kwargs() -> dict[str, Any]:
    """Extra ``Accelerator`` arguments: ``cpu=True`` for a multi-process launch without CUDA."""
    if launched_processes() > 1 and not torch.cuda.is_available():
        return {"cpu": True}
    return {}


def check_launch(accelerator) -> None:
    """Refuse a launch of several processes that accelerate did not join into one process group."""
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        from .trainer import TrainingError

        raise TrainingError(
            f"the launcher started {launched} processes but accelerate runs {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); each would train alone on the whole data. "
            "Launch with `torchrun --nproc_per_node N` (GPUs or CPU) or `accelerate launch --num_processes N` (GPUs)."
        )


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any of them (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(total.item() > 0)


def check_fsdp_version(accelerator) -> None:
    """FSDP2 only: FSDP1's flat parameters would make the adapter's saved tensors shards."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        from .trainer import TrainingError

        raise TrainingError("FSDP1 is not supported: use FSDP2 (`fsdp_version: 2` in the accelerate config, "
                            "or `--fsdp_version 2` for accelerate launch)")


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has sharded the model's parameters (they are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


IMAGE_PATH = ("vision_tower", "vision_model", "multi_modal_projector")


def check_fsdp_units(unwrapped: nn.Module, text_only_samples: bool) -> None:
    """Refuse FSDP units inside the image path when some samples have no image: such a unit runs
    (and all-gathers its shards) only on the ranks whose micro-batch has an image, so the ranks'
    collectives would not match. Wrap the decoder layers only (the vision tower and the projector
    then belong to the root unit, which runs on every rank)."""
    from torch.distributed.fsdp import FSDPModule

    if not text_only_samples:
        return
    units = [name for name, module in unwrapped.named_modules()
             if name and isinstance(module, FSDPModule) and any(part in name for part in IMAGE_PATH)]
    if units:
        from .trainer import TrainingError

        raise TrainingError(
            f"FSDP wraps {units[:3]}{'...' if len(units) > 3 else ''} as separate units, but the data has text-only "
            "samples: those units would run (and all-gather) only on ranks whose batch has an image. Wrap the "
            "decoder layers only, e.g. `--fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer`."
        )


def prepare_sharded(unwrapped: nn.Module) -> None:
    """Make the input embeddings' output require grad. FSDP2 reduce-scatters a layer's gradients
    when the gradient reaches the layer's input if that input requires grad, and at the end of the
    backward otherwise; with a frozen embedding, the first decoder layer's input requires grad only
    when image features (from the trained projector) were scattered into it, so ranks with and
    without images would reduce-scatter in different orders (a collective mismatch)."""
    inner = unwrapped.peft_model if hasattr(unwrapped, "peft_model") else unwrapped.base_model
    inner.enable_input_require_grads()


def full_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Whole CPU tensors from FSDP2's DTensor shards. A collective: every process calls it, with the
    same keys in the same order."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def full_optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, whole, on the main process (empty elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Shard a state written by :func:`full_optimizer_state` back into the optimizer (every process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


class UnusedParameterGuard:
    """Gives every trainable parameter a gradient in every backward, so DDP never waits for one.

    DDP without ``find_unused_parameters`` expects each trainable parameter's gradient in every
    backward; a parameter that gets none fails the next step ("Expected to have finished
    reduction in the prior iteration") or, when other ranks did use it, hangs their all-reduce.
    What does and does not go unused here:

    - Hard task routing does **not** leave experts unused as far as DDP is concerned: a layer's
      experts are one stacked parameter (AsymLoRA's ``expert_b: (N, d_out, r)``, LoRA-MoE's
      ``expert_a`` too, MixLoRA's factor pool) that the fast path gathers per sample
      (``expert_b[task_ids]``), so an expert no sample of the micro-batch uses gets a zero slice
      of a gradient that exists. Soft / top-k gates and the routers are on the graph too.
    - A module whose forward does not run is unused: LLaVA's projector (trained whole through
      ``modules_to_save``) on a rank whose micro-batch holds only text-only samples, and any
      adapter placed on the vision tower in that case. Which rank that is changes from step to
      step, so DDP's ``static_graph`` (a fixed unused set) does not apply.

    ``find_unused_parameters=True`` would handle the second case by traversing the autograd graph
    in every backward. Instead, forward hooks note which parameter-owning modules ran (reset at
    each forward of the model), and a hook at the end of the model's forward adds ``0 · Σ p`` over
    the parameters of those that did not to ``outputs.loss``: their gradient is an exact zero,
    which is also what a rank that saw no image contributes to the mean. The cost is a set
    insertion per module per forward and, only in a step that skipped a module, one sum over that
    module's parameters.

    The hook runs inside the model's forward (before FSDP's post-forward hook reshards it), so with
    FSDP2 the parameters of the root unit, where LLaVA's projector sits under accelerate's
    transformer-layer wrapping, are touched unsharded, and every rank reduce-scatters the same
    tensors (without the touch the ranks' reduce-scatters differ in size: a collective mismatch).
    A sharded parameter of a unit that did not run cannot be touched and is left to FSDP.

    It is applied on one process too, so that a parameter that no sample of a step used gets a
    zero gradient (and AdamW's momentum step) whatever the number of processes: the run does not
    depend on how the global batch is split.
    """

    def __init__(self, model: nn.Module) -> None:
        self.owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.ran: set[nn.Module] = set()
        self._handles = [model.register_forward_pre_hook(lambda *_: self.ran.clear()),
                         model.register_forward_hook(self._touch_loss, prepend=True)]
        self._handles += [m.register_forward_hook(self._mark) for m in self.owners]

    def _mark(self, module: nn.Module, *_: Any) -> None:
        self.ran.add(module)

    def unused(self) -> list[nn.Parameter]:
        """Trainable parameters (as registered now: FSDP2 swaps them) of modules that did not run
        in the last forward, less sharded ones."""
        from torch.distributed.tensor import DTensor

        return [p for m in self.owners if m not in self.ran for p in m.parameters(recurse=False)
                if p.requires_grad and not isinstance(p, DTensor)]

    def touch(self, loss: Tensor) -> Tensor:
        """``loss`` plus a zero-weighted term on every unused parameter (``loss`` itself if none)."""
        unused = self.unused()
        if not unused:
            return loss
        return loss + sum(p.float().sum() for p in unused).to(loss.dtype) * 0.0

    def _touch_loss(self, module: nn.Module, args: Any, outputs: Any) -> None:
        if module.training and torch.is_grad_enabled() and getattr(outputs, "loss", None) is not None:
            outputs.loss = self.touch(outputs.loss)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
