"""What the routers do, per layer and task: usage, gate entropy, own-expert rate, and t-SNE pictures.

For every adapted linear with a router (AsymLoRA and LoRA-MoE with ``routing`` "soft", "topk" or
"task_supervised"; MixLoRA's factor selection, keys ``"<linear>:A"`` and ``"<linear>:B"``):

- selections ``(n_instances, C)``: per instance, the gate weights averaged over its valid tokens
  (C = N experts; they sum to 1), or MixLoRA's multi-hot choice of r factors out of C = E;
- usage[task] ``(C,)``: the mean selection over the task's instances (sums to 1, or to r for
  MixLoRA); MixLoRA's VT-NLP/MixLoRA code plots these counts per layer (``plot_expert_selection``);
- entropy[task]: the router's softmax entropy in nats, averaged over valid tokens (over instances
  for MixLoRA and instance routing), batches weighted by their number of samples;
- own_expert_rate[task] (expert methods): the share of the task's instances whose per-instance gate
  has its argmax at the task's own id, i.e. how often a learned gate picks the task's expert.

``routing="task_supervised"`` models are run *without* task ids, so the learned router decides
(with task ids the gate is the task's one-hot and would say nothing). ``routing="task"`` has no
learned gate and is refused. The t-SNE follows ``cluster_expert_selection_scores`` of
VT-NLP/MixLoRA (``llava/cmoa_eval/utils.py``): sklearn TSNE, 2 components, perplexity 30 (here
``min(30, n − 1)`` so that small sets work), 300 iterations, random_state 42, Euclidean metric;
their binary-selection variant uses ``metric="jaccard"``, available here through ``metric``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .batches import check_batches, model_device, model_inputs, task_ids_for
from .layers import layer_label, select_layers

ProgressCallback = Callable[[int, int], None]
EXPERT_METHODS = ("asymlora", "lora_moe")


@dataclass
class RoutingReport:
    """Routing statistics of one model on per-task batches (see the module docstring).

    layers: the routing keys, in model order. usage[layer]: (n_tasks, C). entropy[layer]: (n_tasks,).
    own_expert_rate[layer]: (n_tasks,), None for MixLoRA. selections[layer]: (n_instances, C), rows in
    the order of ``instance_tasks`` (n_instances,), the index of each instance's task in ``tasks``;
    ``instance_task_ids`` are the task ids the instances were routed with.
    """

    method: str
    routing: str
    tasks: list[str]
    layers: list[str]
    usage: dict[str, np.ndarray]
    entropy: dict[str, np.ndarray]
    own_expert_rate: dict[str, np.ndarray] | None
    selections: dict[str, np.ndarray]
    instance_tasks: np.ndarray
    instance_task_ids: np.ndarray

    def to_dict(self, include_selections: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": self.method, "routing": self.routing, "tasks": self.tasks, "layers": self.layers,
            "usage": {k: v.tolist() for k, v in self.usage.items()},
            "entropy": {k: v.tolist() for k, v in self.entropy.items()},
            "own_expert_rate": None if self.own_expert_rate is None
            else {k: v.tolist() for k, v in self.own_expert_rate.items()},
            "instance_tasks": self.instance_tasks.tolist(), "instance_task_ids": self.instance_task_ids.tolist(),
        }
        if include_selections:
            data["selections"] = {k: v.tolist() for k, v in self.selections.items()}
        return data

    def to_json(self, include_selections: bool = False, indent: int | None = 2) -> str:
        """JSON of the statistics; per-instance selections only on request (they can be large)."""
        return json.dumps(self.to_dict(include_selections), indent=indent)


def _routing_of(model: nn.Module) -> tuple[str, str]:
    config = getattr(model, "config", None)
    method = getattr(config, "method", None)
    if not hasattr(model, "collect_routing") or not method:
        raise TypeError(f"{type(model).__name__} has no router (plain LoRA): routing statistics need an "
                        "AsymLoRA, LoRA-MoE or MixLoRA AdapterModel")
    routing = getattr(config, "routing", "factor_selection")
    if routing == "task":
        raise ValueError(f"{type(config).__name__}.routing='task': the gate is the task id, there is no learned "
                         "router to analyse (use routing 'soft', 'topk' or 'task_supervised')")
    return method, routing


@torch.no_grad()
def routing_statistics(
    model: nn.Module,
    batches_by_task: Mapping[str, Sequence[Mapping[str, Any]]],
    layers: Sequence[str] | str | None = None,
    progress: ProgressCallback | None = None,
) -> RoutingReport:
    """Run every batch of every task through ``model`` (no gradients, eval mode) and summarise routing.

    layers: None (every routed linear), ``"shallow_deep"``, or adapted-linear names / module
    prefixes (as :func:`asymlora.analysis.task_interference`). progress(done, total) after each batch.
    """
    method, routing = _routing_of(model)
    tasks = check_batches(batches_by_task, need_labels=False)
    device = model_device(model)
    total = sum(len(b) for b in batches_by_task.values())
    done = 0
    selections: dict[str, list[np.ndarray]] = {}
    entropy_sums: dict[str, np.ndarray] = {}
    instance_tasks: list[np.ndarray] = []
    instance_ids: list[np.ndarray] = []
    counts = np.zeros(len(tasks))
    was_training = model.training
    model.eval()
    try:
        for t, task in enumerate(tasks):
            for batch in batches_by_task[task]:
                ids = task_ids_for(model, task, t, batch).cpu()
                routed_ids = None if routing == "task_supervised" else ids.to(device)
                with model.collect_routing(stats=True, selections=True):
                    model(**model_inputs(batch, device, with_labels=False), task_ids=routed_ids)
                context = model.routing_context
                n = ids.shape[0]
                for key, chosen in context.selections.items():
                    selections.setdefault(key, []).append(chosen.double().numpy())
                    entropy_sums.setdefault(key, np.zeros(len(tasks)))[t] += n * float(context.stats[key]["entropy"])
                instance_tasks.append(np.full(n, t))
                instance_ids.append(ids.numpy())
                counts[t] += n
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        model.train(was_training)
    if not selections:
        raise ValueError(f"no routing was recorded for {method} with routing={routing!r}")
    keep = select_layers(sorted({k.split(":")[0] for k in selections}), layers)
    wanted = {name for names in keep.values() for name in names}
    keys = [k for k in selections if k.split(":")[0] in wanted]
    owner = np.concatenate(instance_tasks)
    task_ids = np.concatenate(instance_ids)
    stacked = {k: np.concatenate(selections[k]) for k in keys}
    usage = {k: np.stack([stacked[k][owner == t].mean(0) for t in range(len(tasks))]) for k in keys}
    entropy = {k: entropy_sums[k] / counts for k in keys}
    own = None
    if method in EXPERT_METHODS:
        own = {k: np.array([(stacked[k][owner == t].argmax(1) == task_ids[owner == t]).mean()
                            for t in range(len(tasks))]) for k in keys}
    return RoutingReport(method=method, routing=routing, tasks=tasks, layers=keys, usage=usage, entropy=entropy,
                         own_expert_rate=own, selections=stacked, instance_tasks=owner, instance_task_ids=task_ids)


def tsne_embedding(points: np.ndarray, metric: str = "euclidean", random_state: int = 42,
                   iterations: int = 300) -> np.ndarray:
    """2-D t-SNE of ``points: (n, C)`` -> ``(n, 2)`` with perplexity ``min(30, n − 1)`` (n >= 2).

    ``metric="jaccard"`` compares the sets of chosen factors (points are made boolean).
    """
    from sklearn.manifold import TSNE

    points = np.asarray(points)
    n = points.shape[0]
    if n < 2:
        raise ValueError(f"t-SNE needs at least 2 instances, got {n}")
    if metric == "jaccard":
        points = points != 0
    else:
        points = points.astype(np.float64)
    # sklearn renamed n_iter to max_iter (1.5) and later dropped n_iter.
    iterations_name = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    # PCA initialisation assumes Euclidean geometry; for set distances start from random points.
    tsne = TSNE(n_components=2, perplexity=float(min(30, n - 1)), random_state=random_state, metric=metric,
                init="random" if metric == "jaccard" else "pca", **{iterations_name: iterations})
    return tsne.fit_transform(points)


def _plot_layers(report: RoutingReport, layers: Sequence[str] | None, max_layers: int) -> list[str]:
    if layers is not None:
        unknown = [k for k in layers if k not in report.layers]
        if unknown:
            raise ValueError(f"layers {unknown} are not in the report; it has {report.layers[:4]}...")
        return list(layers)
    if len(report.layers) <= max_layers:
        return list(report.layers)
    picks = np.unique(np.linspace(0, len(report.layers) - 1, max_layers).round().astype(int))
    return [report.layers[i] for i in picks]


def _grid(n: int, columns: int = 4) -> tuple[int, int]:
    cols = min(columns, n)
    return -(-n // cols), cols


def plot_routing_usage(report: RoutingReport, path: str | Path, layers: Sequence[str] | None = None,
                       max_layers: int = 12, dpi: int = 120) -> Path:
    """One heatmap per layer: rows = tasks, columns = experts (factors), colour = usage; the title
    gives the mean gate entropy. Default layers: all, or ``max_layers`` evenly spaced ones."""
    from matplotlib.figure import Figure

    chosen = _plot_layers(report, layers, max_layers)
    rows, cols = _grid(len(chosen))
    m = len(report.tasks)
    fig = Figure(figsize=(4.2 * cols, 0.9 + (0.35 * m + 1.3) * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, chosen):
        usage = report.usage[key]
        image = ax.imshow(usage, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(usage.max()), 1e-12))
        ax.set_yticks(range(m), report.tasks, fontsize=8)
        ax.set_xlabel("factor" if ":" in key else "expert", fontsize=8)
        ax.set_title(f"{layer_label(key)}\nentropy {report.entropy[key].mean():.2f} nats", fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"{report.method} routing usage per task ({report.routing})", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_routing_tsne(report: RoutingReport, path: str | Path, layers: Sequence[str] | None = None,
                      max_layers: int = 12, metric: str = "euclidean", dpi: int = 120) -> Path:
    """t-SNE of the per-instance selections, one panel per layer, points coloured by task."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    chosen = _plot_layers(report, layers, max_layers)
    rows, cols = _grid(len(chosen))
    palette = colormaps["tab10" if len(report.tasks) <= 10 else "tab20"]
    fig = Figure(figsize=(3.6 * cols, 3.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, chosen):
        embedded = tsne_embedding(report.selections[key], metric=metric)
        for t, task in enumerate(report.tasks):
            mine = report.instance_tasks == t
            ax.scatter(embedded[mine, 0], embedded[mine, 1], s=14, alpha=0.6, color=palette(t % palette.N), label=task)
        ax.set_title(layer_label(key), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 6), fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def run_routing(
    model: nn.Module,
    batches_by_task: Mapping[str, Sequence[Mapping[str, Any]]],
    output_dir: str | Path,
    layers: Sequence[str] | str | None = None,
    plot_layers: Sequence[str] | None = None,
    tsne_metric: str = "euclidean",
    progress: ProgressCallback | None = None,
) -> RoutingReport:
    """:func:`routing_statistics`, written to ``output_dir`` (the entry point of ``asymlora routing``):
    ``routing.json`` (statistics), ``routing_selections.npz`` (per-instance selections, one array per
    layer, plus ``instance_tasks``), ``routing_usage.png`` and ``routing_tsne.png``."""
    report = routing_statistics(model, batches_by_task, layers=layers, progress=progress)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "routing.json").write_text(report.to_json() + "\n")
    np.savez_compressed(output_dir / "routing_selections.npz", instance_tasks=report.instance_tasks,
                        **{f"layer_{i}": report.selections[k] for i, k in enumerate(report.layers)},
                        layer_names=np.array(report.layers))
    plot_routing_usage(report, output_dir / "routing_usage.png", layers=plot_layers)
    plot_routing_tsne(report, output_dir / "routing_tsne.png", layers=plot_layers, metric=tsne_metric)
    return report
