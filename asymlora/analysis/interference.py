"""Task interference matrices of an adapter's A and B sides (MixLoRA Figure 1).

MixLoRA (Shen et al., 2024, Sec. 3, Figure 1) measures how training one task affects another as
Uni-Perceiver-MoE does (Zhu et al., 2022). Restricted to the parameters θ of one layer's A (or B):

    Δ_j L_i(x_i) = E_{x_j} [ L(x_i; θ) − L(x_i; θ − λ · g_j / ‖g_j‖) ],   g_j = ∇_θ L(x_j)
    I[i, j]      = E_{x_i} [ Δ_j L_i(x_i) / Δ_i L_i(x_i) ]

the loss change of task i after a normalised gradient step of length λ on task j, relative to the
change after task i's own step. Positive: task j's step lowers task i's loss (j helps i);
negative: it raises it (j hurts i); I[i, i] = 1. To first order in λ,
``Δ_j L_i ≈ λ · (g_j / ‖g_j‖) · g_i`` and ``Δ_i L_i ≈ λ · ‖g_i‖``, so ``I[i, j] ≈ cos(g_i, g_j)``.

Sources: the MixLoRA poster shows the heatmaps without a formula and VT-NLP/MixLoRA has no
interference code; a summary of the paper describes I[i, j] as the expected change in task i's
loss when optimising task j, derived from the inner product of their gradients. The formula above
is Uni-Perceiver-MoE's as remembered, not checked against that paper.

What is computed, with x_i^k = the k-th batch of task i (batches paired by index, k < K =
the smallest number of batches of any task) and θ = the layer's A (or B) parameters, flattened:

- ``form="finite_step"``: g_j^k = ∇_θ L(x_j^k); θ is moved to θ − λ·g_j^k/‖g_j^k‖, L(x_i^k) is
  re-evaluated for every i, θ is restored bit-exactly; ``Δ_j L_i^k = L(x_i^k; θ) − L(x_i^k; θ')``
  and ``I[i, j] = mean_k Δ_j L_i^k / Δ_i L_i^k`` (for j = i the step and the evaluation use the
  same batch). Batches where task i's own step did not lower its loss by more than
  ``1e-6 · max(1, L_i)`` are left out of row i (the ratio would be noise).
- ``form="first_order"``: ``I[i, j] = mean_k cos(g_i^k, g_j^k)``, the limit λ → 0 of the above.

A zero gradient gives no step and a cosine of 0, never NaN: a zero g_j makes column j 0, a zero
g_i leaves batch k out of row i; ``valid_batches`` counts the batches each entry averages (0: the
entry is 0 for want of data). MixLoRA's top-r choice can change under a finite step (CFS reads
factor_a), which the first-order form does not see.

Needs a trained, or at least warmed-up, adapter: every B (expert_b, factor_b, lora_B) is zero at
initialisation, so ∂L/∂A = 0 there and the A-side matrices are all zero. The loss is the
language-model cross-entropy without router losses; dropout is off (eval mode) during the analysis.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .batches import check_batches, task_loss
from .layers import SHALLOW_DEEP, SIDES, adapter_parameters, layer_label, select_layers

FORMS = ("first_order", "finite_step")
ProgressCallback = Callable[[int, int], None]
LossFunction = Callable[[nn.Module, str, int, Mapping[str, Any]], Tensor]

# Gradients with a norm at or below this are treated as zero (no step, cosine 0).
_ZERO_NORM = 1e-30
# Own-step loss decreases below this fraction of max(1, loss) are float noise: the batch is left out.
_MIN_RELATIVE_DECREASE = 1e-6


@dataclass
class InterferenceResult:
    """Interference matrices ``matrices[l, s, i, j]``: task j's effect on task i (rows = affected task),
    layer ``layers[l]``, side ``sides[s]``; shape (n_layers, n_sides, n_tasks, n_tasks).

    valid_batches: same shape, how many batch pairs each entry averages. modules: the adapted
    linears behind each layer spec. step_size: λ of the finite-step form (None for first order).
    """

    tasks: list[str]
    layers: list[str]
    sides: list[str]
    form: str
    matrices: np.ndarray
    valid_batches: np.ndarray
    num_batches: int
    step_size: float | None
    modules: dict[str, list[str]]

    def matrix(self, layer: str, side: str) -> np.ndarray:
        """The (n_tasks, n_tasks) matrix of one layer spec and side ("A" or "B")."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} not in this result; layers: {self.layers}")
        if side not in self.sides:
            raise KeyError(f"side {side!r} not in this result; sides: {self.sides}")
        return self.matrices[self.layers.index(layer), self.sides.index(side)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks, "layers": self.layers, "sides": self.sides, "form": self.form,
            "step_size": self.step_size, "num_batches": self.num_batches, "modules": self.modules,
            "matrices": self.matrices.tolist(), "valid_batches": self.valid_batches.tolist(),
            "convention": "matrices[layer][side][i][j]: effect of a step on task j (column) on task i's "
                          "loss (row); positive = j helps i",
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InterferenceResult":
        return cls(
            tasks=list(data["tasks"]), layers=list(data["layers"]), sides=list(data["sides"]), form=data["form"],
            matrices=np.asarray(data["matrices"], dtype=np.float64),
            valid_batches=np.asarray(data["valid_batches"], dtype=np.int64),
            num_batches=int(data["num_batches"]), step_size=data.get("step_size"),
            modules={k: list(v) for k, v in data.get("modules", {}).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> "InterferenceResult":
        return cls.from_dict(json.loads(text))


@dataclass
class _Group:
    """One (layer spec, side): the parameters whose gradient and step the matrix is restricted to."""

    layer: str
    side: str
    params: list[nn.Parameter]


@contextmanager
def _analysis_mode(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode and ``requires_grad`` on the analysed parameters, both restored on exit."""
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _unique(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters in order, each once (layer specs may overlap)."""
    unique: dict[int, nn.Parameter] = {}
    for p in params:
        unique.setdefault(id(p), p)
    return list(unique.values())


def _flat_gradients(loss: Tensor, targets: list[nn.Parameter], groups: list[_Group]) -> list[Tensor]:
    """One flat float64 gradient vector per group (zeros where the loss does not reach a parameter)."""
    grads = torch.autograd.grad(loss, targets, allow_unused=True)
    by_id = {id(p): (torch.zeros_like(p) if g is None else g) for p, g in zip(targets, grads)}
    return [torch.cat([by_id[id(p)].reshape(-1).double() for p in group.params]) for group in groups]


def _cosine_matrix(vectors: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """cos(g_i, g_j) for every pair, 0 where either gradient is zero; and which rows count.

    As in the finite-step form, a zero g_j is no step (entry 0, counted) and a zero g_i leaves row
    i undefined for this batch (not counted).
    """
    stacked = torch.stack(vectors)
    norms = stacked.norm(dim=1)
    nonzero = norms > _ZERO_NORM
    cos = (stacked @ stacked.T) / (norms[:, None] * norms[None, :]).clamp_min(_ZERO_NORM)
    cos = torch.where(nonzero[:, None] & nonzero[None, :], cos, torch.zeros_like(cos))
    return cos.cpu().numpy(), nonzero[:, None].expand_as(cos).cpu().numpy()


@torch.no_grad()
def _step(params: list[nn.Parameter], direction: Tensor, scale: float) -> None:
    """θ += scale · direction (a flat vector split over ``params``)."""
    offset = 0
    for p in params:
        n = p.numel()
        p.add_((scale * direction[offset:offset + n]).view_as(p).to(p.dtype))
        offset += n


@torch.no_grad()
def _loss_changes(model: nn.Module, tasks: list[str], batches: list[Mapping[str, Any]], group: _Group,
                  directions: list[Tensor], base: list[float], step_size: float, loss_fn: LossFunction,
                  tick: Callable[[], None]) -> np.ndarray:
    """``change[i, j] = L(x_i; θ) − L(x_i; θ − λ g_j / ‖g_j‖)`` for one group; θ restored bit-exactly
    from a copy (also when a forward pass fails)."""
    m = len(tasks)
    change = np.zeros((m, m))
    saved = [p.detach().clone() for p in group.params]
    try:
        for j, direction in enumerate(directions):
            norm = float(direction.norm())
            if norm <= _ZERO_NORM:  # no step: column j stays 0
                for _ in range(m):
                    tick()
                continue
            _step(group.params, direction, -step_size / norm)
            for i, (task, batch) in enumerate(zip(tasks, batches)):
                change[i, j] = base[i] - float(loss_fn(model, task, i, batch))
                tick()
            for p, value in zip(group.params, saved):
                p.copy_(value)
    finally:
        for p, value in zip(group.params, saved):
            p.copy_(value)
    return change


def task_interference(
    model: nn.Module,
    batches_by_task: Mapping[str, Sequence[Mapping[str, Any]]],
    layers: Sequence[str] | str | None = SHALLOW_DEEP,
    side: str = "both",
    form: str = "first_order",
    step_size: float = 1e-3,
    loss_fn: LossFunction | None = None,
    progress: ProgressCallback | None = None,
) -> InterferenceResult:
    """Task interference matrices of ``model`` per layer spec and side (formula: module docstring).

    model: an AdapterModel (AsymLoRA, LoRA-MoE, MixLoRA) or a PeftLoraModel, trained or warmed up.
    batches_by_task: ``{task: [batch, ...]}``; the k-th batches of all tasks are paired, and
    ``min_t len(batches_by_task[t])`` pairs are used. layers: ``"shallow_deep"`` (first and last
    Transformer block, every adapted linear in each), ``None`` (every adapted linear on its own) or
    a list of adapted-linear names / module prefixes. side: "A", "B" or "both".
    form: "first_order" (gradient cosines) or "finite_step" (loss changes after a step of length
    ``step_size`` in each layer's A or B alone). loss_fn(model, task, position, batch) -> scalar:
    default the language-model loss. progress(done, total): called after every forward pass.

    The model's parameters, ``requires_grad`` flags and train/eval mode are as before on return.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if side not in SIDES + ("both",):
        raise ValueError(f"side must be 'A', 'B' or 'both', got {side!r}")
    positive = isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)
    if form == "finite_step" and not positive:
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    if getattr(model, "merged_task", None) is not None:
        raise ValueError("the adapter is merged into the base weights, so it has no gradient: unmerge() first")
    tasks = check_batches(batches_by_task, need_labels=loss_fn is None)
    loss_fn = loss_fn or task_loss
    sides = list(SIDES) if side == "both" else [side]
    parameters = adapter_parameters(model)
    selected = select_layers(list(parameters), layers)
    groups = [
        _Group(spec, s, _unique([p for name in names for p in parameters[name][s]]))
        for spec, names in selected.items() for s in sides
    ]
    targets = _unique([p for g in groups for p in g.params])
    num_batches = min(len(b) for b in batches_by_task.values())
    m = len(tasks)
    per_batch = m + (m + len(groups) * m * m if form == "finite_step" else 0)  # forward passes
    total, done = num_batches * per_batch, 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    sums = np.zeros((len(groups), m, m))
    counts = np.zeros((len(groups), m, m), dtype=np.int64)
    with _analysis_mode(model, targets):
        for k in range(num_batches):
            batches = [batches_by_task[t][k] for t in tasks]
            gradients = []  # gradients[t][group]
            for position, (task, batch) in enumerate(zip(tasks, batches)):
                gradients.append(_flat_gradients(loss_fn(model, task, position, batch), targets, groups))
                tick()
            if form == "first_order":
                for g in range(len(groups)):
                    cos, valid = _cosine_matrix([gradients[t][g] for t in range(m)])
                    sums[g] += cos
                    counts[g] += valid
                continue
            with torch.no_grad():
                base = []
                for position, (task, batch) in enumerate(zip(tasks, batches)):
                    base.append(float(loss_fn(model, task, position, batch)))
                    tick()
                for g, group in enumerate(groups):
                    change = _loss_changes(model, tasks, batches, group, [grad[g] for grad in gradients], base,
                                           step_size, loss_fn, tick)
                    for i in range(m):
                        if change[i, i] > _MIN_RELATIVE_DECREASE * max(1.0, abs(base[i])):
                            sums[g, i] += change[i] / change[i, i]
                            counts[g, i] += 1
    matrices = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    shape = (len(selected), len(sides), m, m)
    return InterferenceResult(
        tasks=tasks, layers=list(selected), sides=sides, form=form,
        matrices=matrices.reshape(shape), valid_batches=counts.reshape(shape), num_batches=num_batches,
        step_size=float(step_size) if form == "finite_step" else None, modules=selected,
    )


def plot_interference(result: InterferenceResult, path: str | Path, annotate: bool | None = None,
                      dpi: int = 120) -> Path:
    """Heatmaps as the MixLoRA poster's Figure 1: one panel per (layer, side), rows = layers
    (shallow to deep), columns = A then B; in each panel, row i = affected task, column j = the task
    whose step acts. Red: j helps i, blue: j hurts i; the colour scale is centred on zero and shared
    by all panels. ``annotate`` writes the values in the cells (default: up to 8 tasks).
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    path = Path(path)
    n_layers, n_sides, m = len(result.layers), len(result.sides), len(result.tasks)
    if n_layers == 0 or m == 0:
        raise ValueError("the interference result is empty: nothing to plot")
    annotate = m <= 8 if annotate is None else annotate
    limit = float(np.max(np.abs(result.matrices))) if result.matrices.size else 0.0
    limit = max(limit, 1.0 if result.form == "first_order" else 1e-12)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    cell = max(0.45, 0.3 * m)
    fig = Figure(figsize=(1.2 + (cell * m + 1.6) * n_sides, 0.9 + (cell * m + 1.4) * n_layers), layout="constrained")
    axes = fig.subplots(n_layers, n_sides, squeeze=False)
    image = None
    for l, layer in enumerate(result.layers):
        for s, side in enumerate(result.sides):
            ax = axes[l, s]
            values = result.matrices[l, s]
            image = ax.imshow(values, cmap="RdBu_r", norm=norm)
            ax.set_xticks(range(m), result.tasks, rotation=45, ha="right")
            ax.set_yticks(range(m), result.tasks)
            ax.set_title(f"{side} side, {layer_label(layer)}", fontsize=10)
            if l == n_layers - 1:
                ax.set_xlabel("task j (step taken)")
            if s == 0:
                ax.set_ylabel("task i (affected)")
            if annotate:
                for i in range(m):
                    for j in range(m):
                        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(values[i, j]) > 0.6 * limit else "black")
    form = "first order: gradient cosine" if result.form == "first_order" else f"finite step, λ = {result.step_size:g}"
    fig.suptitle(f"Task interference I[i, j] ({form})", fontsize=11)
    fig.colorbar(image, ax=axes, shrink=0.8, label="I[i, j]  (> 0: j helps i)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def run_interference(
    model: nn.Module,
    batches_by_task: Mapping[str, Sequence[Mapping[str, Any]]],
    output_dir: str | Path,
    **kwargs: Any,
) -> InterferenceResult:
    """``task_interference(model, batches_by_task, **kwargs)``, written to ``output_dir`` as
    ``interference.json`` and ``interference.png`` (the entry point of ``asymlora interference``)."""
    result = task_interference(model, batches_by_task, **kwargs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "interference.json").write_text(result.to_json() + "\n")
    plot_interference(result, output_dir / "interference.png")
    return result
