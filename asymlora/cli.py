"""``asymlora`` command line: train | eval | table | interference | routing | suite | demo.

The only place that reads argv or prints; progress bars live here too. Library errors that
describe bad input (ConfigError, DataError, ModelLoadError, ...) are printed as one clear line
and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)


def _print_log(record: dict) -> None:
    if "warning" in record:
        print(f"warning: {record['warning']}", file=sys.stderr)
        return
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key == "step":
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    from tqdm.auto import tqdm

    tqdm.write("  ".join(parts))


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_run_config
    from .train.trainer import train

    config = load_run_config(args.config, args.set)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate, one process speaks
    bar = _progress(config.train.max_steps, "train") if main_process else None
    result = train(config, resume=args.resume, on_log=_print_log if main_process else None,
                   on_step=(lambda step, total: bar.update(step - bar.n)) if bar else None)
    if not main_process:
        return 0
    bar.close()
    print(f"trained {result.steps} steps ({result.trainable_parameters:,d} trainable parameters, "
          f"{result.mean_step_time_s * 1000:.0f} ms/step){'; resumed from ' + result.resumed_from if result.resumed_from else ''}")
    if result.steps >= config.train.max_steps:
        print(f"adapter: {result.adapter_dir}")
    print(result.data_summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.evaluate import evaluate, load_adapter_model

    if args.task and args.route:
        raise ValueError("--task and --route are exclusive: route every sample through one task's expert, or learn")
    if len(args.benchmark) != len(args.data):
        raise ValueError(f"give one --data per --benchmark ({len(args.benchmark)} benchmarks, {len(args.data)} data paths)")
    model, processor = load_adapter_model(args.adapter, args.model, args.dtype)
    out = Path(args.out or Path(args.adapter) / "eval")
    bars: dict[str, object] = {}

    def progress(name: str, done: int, total: int) -> None:
        bar = bars.get(name) or bars.setdefault(name, _progress(total, name))
        bar.update(done - bar.n)

    evaluate(model, processor, dict(zip(args.benchmark, args.data)), out, route=args.route, task=args.task,
             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, split=args.split,
             image_root=args.image_root, limit=args.limit, tasks=args.tasks, on_progress=progress)
    for bar in bars.values():
        bar.close()
    print((out / "metrics.md").read_text())
    print(f"predictions and metrics in {out}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from .evaluate.runner import render_comparison_table

    runs = {}
    for item in args.runs:
        if "=" not in item:
            raise ValueError(f"{item!r}: expected METHOD=path/to/metrics.json")
        method, path = item.split("=", 1)
        runs[method] = path
    print(render_comparison_table(runs, columns=args.columns or None))
    return 0


def _analysis_inputs(args: argparse.Namespace):
    """Model + adapter + per-task batches for the analysis commands, from a run config."""
    import torch

    from .analysis.batches import collate_task_batches
    from .data import DataCollator
    from .train.config import load_run_config
    from .train.trainer import build, load_adapter_state

    config = load_run_config(args.config, args.set)
    adapter = Path(args.adapter or Path(config.train.output_dir) / "adapter")
    names_file = adapter / "task_names.json"
    from .adapters.inject import read_adapter_config

    saved = read_adapter_config(adapter)
    task_names = saved.get("task_names") or (json.loads(names_file.read_text()) if names_file.is_file() else None)
    model, processor, mixture = build(config, task_names)
    load_adapter_state(model, adapter)
    model.eval()
    dataset, val = mixture.datasets(processor)
    use_val = val is not None and args.split == "val"
    batches = collate_task_batches(val if use_val else dataset, mixture.val_task_ids if use_val else mixture.train_task_ids,
                                   mixture.task_names, DataCollator.from_processor(processor), args.batches,
                                   args.batch_size)
    torch.manual_seed(0)
    return model, {name: batches[name] for name in mixture.task_names if name in batches}


def cmd_interference(args: argparse.Namespace) -> int:
    from .analysis import run_interference

    model, batches = _analysis_inputs(args)
    out = Path(args.out)
    bar = _progress(0, "interference")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    result = run_interference(model, batches, out, layers=args.layers or "shallow_deep", side=args.side,
                              form=args.form, step_size=args.step_size, progress=progress)
    bar.close()
    print(f"tasks: {result.tasks}")
    print(f"wrote {out / 'interference.json'} and {out / 'interference.png'}")
    return 0


def cmd_routing(args: argparse.Namespace) -> int:
    from .analysis import run_routing

    model, batches = _analysis_inputs(args)
    out = Path(args.out)
    run_routing(model, batches, out)
    print(f"wrote {out / 'routing.json'}, {out / 'routing_usage.png'} and {out / 'routing_tsne.png'}")
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    from .data.suite import demo_tasks, generate_suite

    tasks = demo_tasks() if args.demo else (args.tasks or None)
    manifest = generate_suite(args.out, seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                              tasks=tasks, image_size=args.image_size)
    print(f"wrote {len(manifest.tasks)} tasks to {args.out} (held out: {manifest.held_out})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(out_dir=Path(args.out), quick=args.quick, seed=args.seed)
    bar_holder: dict[str, object] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bar_holder.get(stage)
        if bar is None:
            for old in bar_holder.values():
                old.close()
            bar_holder.clear()
            bar = bar_holder[stage] = _progress(total, stage)
        bar.update(done - bar.n)

    report = run_demo(settings, progress=progress, log=lambda text: print(text, flush=True))
    for bar in bar_holder.values():
        bar.close()
    print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asymlora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter from a YAML run config")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (YAML value)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="generate and score an adapter on benchmarks")
    p.add_argument("--adapter", required=True)
    p.add_argument("--benchmark", action="append", required=True,
                   help="suite, vqav2, textvqa, vizwiz, gqa, mme, pope, scienceqa, cifar10, cifar100, mnist, snli_ve, mmvet")
    p.add_argument("--data", action="append", required=True, help="data path for each --benchmark, in order")
    p.add_argument("--task", help="route every sample through this task's expert")
    p.add_argument("--route", choices=["learned"], help="no task ids: the adapter's learned router decides")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--out")
    p.add_argument("--split", default="test")
    p.add_argument("--image-root")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, help="first N samples of each benchmark")
    p.add_argument("--tasks", nargs="*", help="suite only: which tasks to evaluate (default: all)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("table", help="the papers' comparison table from several eval runs")
    p.add_argument("runs", nargs="+", metavar="METHOD=METRICS_JSON")
    p.add_argument("--columns", nargs="*")
    p.set_defaults(func=cmd_table)

    for name, func, help_text in (("interference", cmd_interference, "task interference matrices per layer, A and B"),
                                  ("routing", cmd_routing, "expert / factor usage, entropy and t-SNE per task")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="the run config the adapter was trained with")
        p.add_argument("--adapter", help="adapter folder (default: <output_dir>/adapter)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--out", default=f"{name}_out")
        p.add_argument("--split", choices=["train", "val"], default="val")
        p.add_argument("--batches", type=int, default=4, help="batches per task")
        p.add_argument("--batch-size", type=int, default=8)
        if name == "interference":
            p.add_argument("--layers", nargs="*", help="layer names or prefixes (default: shallowest and deepest block)")
            p.add_argument("--side", choices=["A", "B", "both"], default="both")
            p.add_argument("--form", choices=["first_order", "finite_step"], default="first_order")
            p.add_argument("--step-size", type=float, default=1e-3)
        p.set_defaults(func=func)

    p = sub.add_parser("suite", help="generate the multi-task instruction suite (LLaVA format)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tasks", nargs="*")
    p.add_argument("--demo", action="store_true", help="only the demo's tasks")
    p.set_defaults(func=cmd_suite)

    p = sub.add_parser("demo", help="the embedded multi-task demo (CPU, offline, <= 10 minutes)")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much smaller run (a smoke test)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .adapters.config import ConfigError
    from .data.errors import DataError
    from .models.errors import ModelLoadError
    from .train.checkpoint import CheckpointError
    from .train.trainer import TrainingError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelLoadError, CheckpointError, TrainingError, FileNotFoundError, ValueError) as err:
        print(f"asymlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
