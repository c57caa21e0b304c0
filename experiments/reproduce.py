"""The papers' comparison at small scale: methods x seeds on a conflicting-domain mixture.

Stage 1 is the aligned smol-llava (EfficientNet-Lite0 + LLaVA-1.5 projector aligned in
experiments/results/smol_llava_stage1 + SmolLM2-135M-Instruct). Stage 2 freezes it and tunes
each method on a mixture of three domains built like AsymLoRA's VQA + Gen setting (Table 1/4):

- ``vqa``: short answers (vqa_color, vqa_shape, gqa_relation, where_short, count_digit);
- ``cls``: classification and choices (digits, science_mc, mme);
- ``gen``: long / generative answers (describe, where_long) and count_word, which asks
  count_digit's question about the same images with the opposite answer convention.

The domain is the task id (N = 3 experts, one per domain, for task routing). ``--setting single``
is setting (a): three short-answer VQA tasks of one domain, each its own task id. Three tasks are held
out (count_reworded, color_at_position, digit_mc) for zero-shot transfer, as MixLoRA does. Each
run is scored per task with the task's metric on held-out test samples; the table is mean ± std
over seeds. Interference heatmaps come from the LoRA r 8 run of the first seed, the routing t-SNE
from MixLoRA's.

    python experiments/reproduce.py --out OUT [--seeds 0 1 2] [--jobs 6] [--setting single]   # GPU
    python experiments/reproduce.py --out OUT --smoke                               # CPU, CI
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAINS = {
    "vqa": ["vqa_color", "vqa_shape", "gqa_relation", "where_short", "count_digit"],
    "cls": ["digits", "science_mc", "mme"],
    "gen": ["describe", "where_long", "count_word"],
}
HELD_OUT = {"count_reworded": "vqa", "color_at_position": "vqa", "digit_mc": "cls"}
# Setting (a): one domain, short-answer VQA, each task its own id (N = 3 experts, one per task).
SETTINGS = {
    "conflicting": (DOMAINS, HELD_OUT),
    "single": ({"color": ["vqa_color"], "shape": ["vqa_shape"], "relation": ["gqa_relation"]},
               {"color_at_position": "color"}),
}
ALIAS = {task: domain for domain, tasks in DOMAINS.items() for task in tasks} | HELD_OUT


def use_setting(name: str) -> None:
    """Point DOMAINS / HELD_OUT / ALIAS at one of SETTINGS (workers receive the name too)."""
    global DOMAINS, HELD_OUT, ALIAS
    DOMAINS, HELD_OUT = SETTINGS[name]
    ALIAS = {task: domain for domain, tasks in DOMAINS.items() for task in tasks} | HELD_OUT

METHODS = {
    "LoRA r4": {"method": "lora", "r": 4, "lora_alpha": 8},
    "LoRA r32": {"method": "lora", "r": 32, "lora_alpha": 64},
    "LoRA-MoE N3 task": {"method": "lora_moe", "r": 32, "lora_alpha": 64, "num_experts": 3, "routing": "task"},
    "AsymLoRA N3 task": {"method": "asymlora", "r": 32, "lora_alpha": 64, "num_experts": 3, "routing": "task"},
    "AsymLoRA N3 learned": {"method": "asymlora", "r": 32, "lora_alpha": 64, "num_experts": 3,
                            "routing": "task_supervised", "granularity": "instance"},
    "MixLoRA E16 r4": {"method": "mixlora", "r": 4, "num_factors": 16, "lora_alpha": 32},
    "MixLoRA E16 r4 no CFS": {"method": "mixlora", "r": 4, "num_factors": 16, "lora_alpha": 32, "conditional": False},
    "MixLoRA E32 r8": {"method": "mixlora", "r": 8, "num_factors": 32, "lora_alpha": 64},
    "LoRA r8": {"method": "lora", "r": 8, "lora_alpha": 16},
    "MixLoRA E32 r2": {"method": "mixlora", "r": 2, "num_factors": 32, "lora_alpha": 64},
}
SMOKE_METHODS = ["LoRA r4", "MixLoRA E16 r4"]  # the two the analysis reads


def slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "")


def mixture(suite: Path) -> list[dict]:
    """One dataset per suite task, its records relabelled with their domain (a record's own
    ``task`` field wins over the dataset's in a mixture, so the copies carry the domain)."""
    from asymlora.data.suite import load_suite

    manifest = load_suite(suite)
    folder = suite.parent / ("domain_data" if DOMAINS is SETTINGS["conflicting"][0] else "task_data")
    folder.mkdir(exist_ok=True)
    datasets = []
    for domain, tasks in DOMAINS.items():
        for task in tasks:
            path = folder / f"{task}.jsonl"
            if not path.is_file():
                lines = [json.dumps({**r, "task": domain}) for r in manifest.records(task, "train")]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("\n".join(lines) + "\n")
                tmp.replace(path)
            datasets.append({"task": domain, "name": task, "path": str(path), "image_folder": str(manifest.image_folder),
                             "weight": 1.0})
    return datasets


def run_one(args: argparse.Namespace) -> None:
    """Worker: train one method with one seed, evaluate it, write result.json."""
    import torch

    from asymlora import from_pretrained
    from asymlora.evaluate.evaluate import evaluate
    from asymlora.models import load_model
    from asymlora.train import run_config_from_dict, train

    out = Path(args.run_dir)
    adapter = dict(METHODS[args.method])
    cuda = torch.cuda.is_available()
    config = run_config_from_dict({
        "model": {"name_or_path": str(args.base), "dtype": "float32"},
        "adapter": adapter,
        "data": {"datasets": mixture(Path(args.suite)), "tasks": list(DOMAINS), "seed": args.seed, "max_length": 256},
        "train": {"output_dir": str(out / "run"), "seed": args.seed, "max_steps": args.steps, "batch_size": args.batch,
                  "learning_rate": args.lr, "projector_learning_rate": 2e-5, "mixed_precision": "bf16" if cuda else "no",
                  "logging_steps": 50, "save_steps": 100_000, "tensorboard": False, "router_stats_steps": 50,
                  "num_workers": 2 if cuda else 0},
    }, source=f"reproduce:{args.method}:{args.seed}")
    result = train(config)
    base, processor = load_model(args.base)
    model = from_pretrained(base.to("cuda" if cuda else "cpu"), result.adapter_dir).eval()
    route = "learned" if adapter.get("routing") == "task_supervised" else None
    scores = evaluate(model, processor, {"suite": Path(args.suite)}, out / "eval", batch_size=64, max_new_tokens=40,
                      limit=args.limit, tasks=list(ALIAS), task_alias=ALIAS, route=route)
    (out / "result.json").write_text(json.dumps({
        "method": args.method, "seed": args.seed, "scores": scores, "trainable_parameters": result.trainable_parameters,
        "step_time_s": result.mean_step_time_s, "history": result.history[-3:]}, indent=2) + "\n")


def prepare(args: argparse.Namespace) -> tuple[Path, Path]:
    """The frozen base as a llava-hf folder (loads in a second) and the generated suite."""
    from asymlora.data.suite import generate_suite
    from asymlora.models import load_model

    base = args.out / "base"
    if not (base / "config.json").is_file():
        if args.smoke:
            model, processor = load_model("tiny-llava")
        else:
            model, processor = load_model("smol-llava", projector_path=ROOT / "experiments/results/smol_llava_stage1/align")
        model.save_pretrained(base)
        processor.save_pretrained(base)
    suite = args.out / "suite"
    if not (suite / "manifest.json").is_file():
        generate_suite(suite, seed=1234, n_train=args.n_train, n_val=8, n_test=args.limit, image_size=64)
    return base, suite


def analyse(args: argparse.Namespace, base: Path, suite: Path, seed: int) -> dict:
    """Interference heatmaps for the LoRA run, routing t-SNE for MixLoRA (first seed)."""
    from asymlora.analysis import run_interference, run_routing
    from asymlora.analysis.batches import collate_task_batches
    from asymlora.data import DataCollator, Mixture
    from asymlora import from_pretrained
    from asymlora.models import load_model

    out = {}
    for method, kind in (("LoRA r4", "interference"), ("MixLoRA E16 r4", "routing")):
        run = args.out / "runs" / f"{slug(method)}-s{seed}"
        if not (run / "result.json").is_file():
            continue
        model_base, processor = load_model(base)
        model = from_pretrained(model_base, run / "run" / "adapter").eval()
        mix = Mixture.from_dict({"datasets": mixture(suite), "tasks": list(DOMAINS), "seed": 0, "max_length": 256})
        dataset, _ = mix.datasets(processor)
        batches = collate_task_batches(dataset, mix.train_task_ids, mix.task_names,
                                       DataCollator.from_processor(processor), batches_per_task=4, batch_size=8)
        target = args.out / "analysis" / slug(method)
        if kind == "interference":
            result = run_interference(model, batches, target)
            out[method] = {"interference": json.loads(result.to_json())}
        else:
            run_routing(model, batches, target)
            out[method] = {"routing": str(target)}
    return out


def aggregate(args: argparse.Namespace, methods: list[str], seeds: list[int]) -> str:
    raw = {}
    for method in methods:
        results = [json.loads(path.read_text()) for seed in seeds
                   if (path := args.out / "runs" / f"{slug(method)}-s{seed}" / "result.json").is_file()]
        if results:
            raw[method] = results
    (args.out / "raw_results.json").write_text(json.dumps(raw, indent=2) + "\n")
    return results_table(raw)


def results_table(raw: dict[str, list[dict]]) -> str:
    """Methods as rows, tasks as columns, mean ± std over the seeds each method has."""
    from asymlora.evaluate.evaluate import headline

    tasks = [t for d in DOMAINS.values() for t in d]
    held = list(HELD_OUT)
    rows = []
    for method, results in raw.items():
        def cell(task: str) -> str:
            values = [headline(r["scores"][task]) for r in results if task in r["scores"]]
            if not values:
                return "—"
            return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

        def mean_of(group: list[str]) -> str:
            per_seed = [statistics.mean(headline(r["scores"][t]) for t in group) for r in results]
            return (f"{statistics.mean(per_seed):.1f} ± {statistics.stdev(per_seed):.1f}" if len(per_seed) > 1
                    else f"{per_seed[0]:.1f}")

        non_mme = [t for t in tasks if t != "mme"]
        seeds = ",".join(str(r["seed"]) for r in results)
        rows.append(f"| {method} | " + " | ".join(cell(t) for t in tasks + held) + f" | {mean_of(non_mme)} | {mean_of(held)} | "
                    f"{results[0]['trainable_parameters']:,d} | {1000 * statistics.mean(r['step_time_s'] for r in results):.0f} | {seeds} |")
    head = ("| method | " + " | ".join(tasks + [f"{t} (held out)" for t in held])
            + " | avg trained (excl. MME) | avg held out | trainable params | ms / step | seeds |")
    return "\n".join([head, "|" + "---|" * (len(tasks) + len(held) + 6), *rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="results; runs already finished there are skipped")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--jobs", type=int, default=6, help="runs at once (the GPU holds many small runs)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--limit", type=int, default=48)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="conflicting",
                   help="conflicting: three domains (the default); single: three tasks of one domain")
    p.add_argument("--skip-analysis", action="store_true", help="no heatmaps / t-SNE (runs for extra seeds)")
    p.add_argument("--smoke", action="store_true", help="tiny-llava, a few steps: the CI smoke test")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--suite", help=argparse.SUPPRESS)
    p.add_argument("--table-from", type=Path, help="print the table of a raw_results.json and exit")
    args = p.parse_args()
    use_setting(args.setting)
    if args.table_from:
        return print(results_table(json.loads(args.table_from.read_text())))
    if args.out is None:
        p.error("--out is required")
    if args.worker:
        return run_one(args)
    if args.smoke:
        args.steps, args.batch, args.n_train, args.limit, args.seeds = 2, 4, 6, 2, args.seeds[:1]
        args.jobs = 1
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, suite = prepare(args)
    methods = args.methods or (SMOKE_METHODS if args.smoke else list(METHODS))
    pending = [(m, s) for s in args.seeds for m in methods
               if not (args.out / "runs" / f"{slug(m)}-s{s}" / "result.json").is_file()]
    running: list[tuple[subprocess.Popen, str]] = []
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    failures = []
    while pending or running:
        while pending and len(running) < args.jobs:
            method, seed = pending.pop(0)
            run_dir = args.out / "runs" / f"{slug(method)}-s{seed}"
            cmd = [sys.executable, __file__, "--worker", "--out", str(args.out), "--method", method, "--seed", str(seed),
                   "--run-dir", str(run_dir), "--base", str(base), "--suite", str(suite), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--lr", str(args.lr), "--limit", str(args.limit), "--setting", args.setting]
            log = open(log_dir / f"{slug(method)}-s{seed}.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}), f"{method} seed {seed}"))
            print(f"started {method} seed {seed}", flush=True)
        time.sleep(2)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"finished {name}: rc {proc.returncode} ({time.perf_counter() - started:.0f} s)", flush=True)
                if proc.returncode:
                    failures.append(name)
    analysis = {} if args.skip_analysis or args.setting != "conflicting" else analyse(args, base, suite, args.seeds[0])
    table = aggregate(args, methods, args.seeds)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = "\n".join([
        f"# Small-scale reproduction ({device}; seeds {args.seeds}; {args.steps} steps x {args.batch}; "
        f"{args.limit} test samples per task)", "",
        "Scores in percent (MME: the sum of subtask scores, out of 1000); mean ± std over seeds.", "", table, "",
        f"Failed runs: {failures or 'none'}. Wall time {time.perf_counter() - started:.0f} s.",
        f"Analysis: {sorted(analysis)}",
    ])
    (args.out / "report.md").write_text(report + "\n")
    print(report)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
