"""``asymlora eval`` as a library: load a base model and an adapter, generate, score, write files.

For each benchmark: ``<out>/<benchmark>.predictions.jsonl`` (resumable), and every metric in
``<out>/metrics.json`` with a markdown table beside it. The generated suite (``--benchmark
suite``) is scored per task with each task's own metric (asymlora.data.suite.score_task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from .generation import make_generate_batch
from .loaders import load_benchmark
from .runner import _write_metrics, metrics_markdown, run_predictions, score
from .samples import EvalSample


def load_adapter_model(adapter: str | Path, model_name: str | None = None, dtype: str | None = None):
    """Base model (``model_name``, else the one the adapter records) + adapter, in eval mode."""
    from ..adapters.inject import from_pretrained, read_adapter_config
    from ..models import load_model

    data = read_adapter_config(adapter)
    name = model_name or data.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{adapter}/adapter_config.json records no base_model_name_or_path: pass --model")
    base, processor = load_model(name, dtype=dtype)
    model = from_pretrained(base, adapter)
    model.eval()
    return model, processor


def suite_samples(root: str | Path, split: str = "test", tasks: Sequence[str] | None = None) -> dict[str, list[EvalSample]]:
    """The generated suite's records as EvalSamples, per task (meta keeps the record for scoring)."""
    from ..data.suite import load_suite

    manifest = load_suite(root)
    out = {}
    for task in tasks or manifest.tasks:
        samples = []
        for record in manifest.records(task, split):
            question = record["conversations"][0]["value"].replace("<image>\n", "").replace("<image>", "")
            image = Path(manifest.image_folder) / record["image"] if record.get("image") else None
            samples.append(EvalSample(id=record["id"], benchmark=task, question=question, prompt=question,
                                      image=image, answers=list(record.get("answers", [])),
                                      meta={"task": task, "record": record}))
        out[task] = samples
    return out


def task_router(model, route: str | None, task: str | None,
                task_alias: dict[str, str] | None = None) -> Callable[[EvalSample], int | None]:
    """How each sample is routed: a fixed ``task``, ``route="learned"`` (no ids), or its own task
    (``task_alias`` maps a benchmark task to the adapter task it was trained under, e.g. a
    suite task to its domain)."""
    names = list(getattr(model, "task_names", None) or [])
    if task is not None:
        if task not in names:
            raise ValueError(f"--task {task!r} is not a task of this adapter; its tasks: {names}")
        fixed = names.index(task)
        return lambda s: fixed
    if route == "learned":
        return lambda s: None

    def own(sample: EvalSample) -> int | None:
        name = sample.meta.get("task")
        name = (task_alias or {}).get(name, name)
        if name is None or name not in names:
            if getattr(getattr(model, "config", None), "routing", None) == "task":
                raise ValueError(
                    f"sample {sample.id!r} of task {name!r} has no expert in this adapter (tasks: {names}); "
                    "pass --task NAME to route it through one, or use an adapter with a learned router and --route learned"
                )
            return None
        return names.index(name)

    return own


def evaluate(model, processor, benchmarks: dict[str, str | Path], out_dir: str | Path, *, route: str | None = None,
             task: str | None = None, batch_size: int = 16, max_new_tokens: int = 32, split: str = "test",
             image_root: str | Path | None = None, limit: int | None = None, tasks: Sequence[str] | None = None,
             task_alias: dict[str, str] | None = None,
             on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on each ``{benchmark name: data path}``; returns ``{name: metrics}``.

    ``tasks`` restricts the generated suite to those tasks (default: every task it holds).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    route_of = task_router(model, route, task, task_alias)
    generate_batch = make_generate_batch(model, processor, route_of, max_new_tokens=max_new_tokens)
    results: dict[str, dict[str, float]] = {}
    metrics_path = out_dir / "metrics.json"
    for name, data in benchmarks.items():
        if name == "suite":
            from ..data.suite import score_task

            for task_name, samples in suite_samples(data, split, tasks).items():
                samples = samples[:limit] if limit else samples
                preds = run_predictions(samples, generate_batch, out_dir / f"suite.{task_name}.predictions.jsonl",
                                        batch_size=batch_size,
                                        on_progress=(lambda d, t, n=task_name: on_progress(n, d, t)) if on_progress else None)
                metrics = score_task([s.meta["record"] for s in samples], preds)
                results[task_name] = metrics
                _write_metrics(metrics_path, task_name, metrics)
            continue
        samples = load_benchmark(name, data, image_root=image_root, split=split)
        samples = samples[:limit] if limit else samples
        preds = run_predictions(samples, generate_batch, out_dir / f"{name}.predictions.jsonl", batch_size=batch_size,
                                on_progress=(lambda d, t, n=name: on_progress(n, d, t)) if on_progress else None)
        results[name] = score(name, samples, preds, metrics_path=metrics_path)
    (out_dir / "metrics.md").write_text(metrics_markdown(results) + "\n")
    return results


def headline(metrics: dict[str, float]) -> float:
    """One number per task for tables: accuracy, MME perception-style score, or caption token F1."""
    for key in ("accuracy", "token_f1", "f1", "average", "total"):
        if key in metrics:
            return float(metrics[key])
    if "perception" in metrics:
        return float(metrics["perception"])
    return float(next(iter(metrics.values())))


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
