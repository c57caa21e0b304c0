"""Issue 10's report in one run: align smol-llava's projector (LLaVA stage 1), score the aligned
model zero-shot on the generated suite, fine-tune one LoRA on the suite, score it again.

    python experiments/smol_llava_stage1.py --out OUT [--model smol-llava] [--align-steps 600] ...

On the GPU machine the weights come from ``ASYMLORA_WEIGHTS_DIR`` (see README: staging). A smoke
run on the CPU: ``--model tiny-llava --align-steps 2 --finetune-steps 2 --n-train 8 --limit 4``.
Writes OUT/report.md and OUT/report.json (plus the alignment's own report under OUT/align).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asymlora import LoraConfig, get_model  # noqa: E402
from asymlora.data.suite import generate_suite, load_suite, mixture_config  # noqa: E402
from asymlora.evaluate.evaluate import evaluate, headline  # noqa: E402
from asymlora.models import load_model  # noqa: E402
from asymlora.train import run_config_from_dict, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smol-llava")
    p.add_argument("--align-steps", type=int, default=600)
    p.add_argument("--align-batch", type=int, default=64)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-batch", type=int, default=32)
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--limit", type=int, default=96, help="test samples per task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    bf16 = torch.cuda.is_available()

    started = time.perf_counter()
    align_dir = out / "align"
    subprocess.run([sys.executable, str(ROOT / "scripts/models/align_projector.py"), "--model", args.model,
                    "--out", str(align_dir), "--steps", str(args.align_steps), "--batch-size", str(args.align_batch),
                    "--seed", str(args.seed)], check=True)
    timings["align_s"] = time.perf_counter() - started
    align_report = json.loads((align_dir / "report.json").read_text())

    aligned_dir = out / "aligned_model"
    kwargs = {"projector_path": align_dir} if args.model == "smol-llava" else {}
    model, processor = load_model(args.model, **kwargs)
    if args.model != "smol-llava":  # tiny-llava smoke runs: load the aligned projector by hand
        from safetensors.torch import load_file

        state = load_file(str(align_dir / "projector.safetensors"))
        model.model.multi_modal_projector.load_state_dict(state)
    model.save_pretrained(aligned_dir)
    processor.save_pretrained(aligned_dir)

    suite_dir = out / "suite"
    generate_suite(suite_dir, seed=args.seed, n_train=args.n_train, n_val=16, n_test=args.limit, image_size=64)
    manifest = load_suite(suite_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    started = time.perf_counter()
    base, processor = load_model(aligned_dir)
    zero = get_model(base.to(device), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 exclude_modules=r".*vision_tower.*")).eval()  # B = 0: the base itself
    zero_scores = evaluate(zero, processor, {"suite": suite_dir}, out / "eval_zero_shot", batch_size=64,
                           max_new_tokens=48, limit=args.limit)
    timings["zero_shot_eval_s"] = time.perf_counter() - started
    del zero, base

    started = time.perf_counter()
    config = run_config_from_dict({
        "model": {"name_or_path": str(aligned_dir), "dtype": "float32"},
        "adapter": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05},
        "data": {"datasets": mixture_config(suite_dir), "seed": args.seed, "max_length": 256},
        "train": {"output_dir": str(out / "lora_run"), "seed": args.seed, "max_steps": args.finetune_steps,
                  "batch_size": args.finetune_batch, "learning_rate": 1e-3, "projector_learning_rate": 2e-5,
                  "mixed_precision": "bf16" if bf16 else "no", "logging_steps": 25, "save_steps": 100_000,
                  "tensorboard": False},
    }, source="stage1-finetune")
    result = train(config, on_log=lambda r: print(json.dumps(r), flush=True))
    timings["finetune_s"] = time.perf_counter() - started

    started = time.perf_counter()
    from asymlora import from_pretrained

    base, processor = load_model(aligned_dir)
    tuned = from_pretrained(base.to(device), result.adapter_dir).eval()
    tuned_scores = evaluate(tuned, processor, {"suite": suite_dir}, out / "eval_lora", batch_size=64,
                            max_new_tokens=48, limit=args.limit)
    timings["lora_eval_s"] = time.perf_counter() - started

    rows = []
    for task in manifest.tasks:
        role = "held out" if task in manifest.held_out else "trained"
        z, t = headline(zero_scores[task]), headline(tuned_scores[task])
        rows.append(f"| {task} | {manifest.metric(task)} | {role} | {z:.1f} | {t:.1f} |")
    trained = [t for t in manifest.tasks if t not in manifest.held_out]
    mean = lambda scores, tasks: sum(headline(scores[t]) for t in tasks) / len(tasks)  # noqa: E731
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = "\n".join([
        f"# smol-llava: stage-1 alignment, zero-shot, one LoRA ({device_name}, seed {args.seed})", "",
        f"Stage 1: projector only, {args.align_steps} steps x {args.align_batch}; loss {align_report.get('loss_first_10pct', float('nan')):.3f} -> "
        f"{align_report.get('loss_last_10pct', float('nan')):.3f} (see align/report.md, align/loss_curve.png).",
        f"LoRA r 16 on every trained task of the suite, {args.finetune_steps} steps x {args.finetune_batch}, "
        f"{result.trainable_parameters:,d} trainable parameters. Scores on {args.limit} test samples per task (percent).", "",
        "| task | metric | role | aligned, zero-shot | + LoRA |", "|---|---|---|---|---|", *rows, "",
        f"Mean over trained tasks: zero-shot {mean(zero_scores, trained):.1f}, LoRA {mean(tuned_scores, trained):.1f}.",
        f"Timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}",
    ])
    (out / "report.md").write_text(report + "\n")
    (out / "report.json").write_text(json.dumps({"zero_shot": zero_scores, "lora": tuned_scores, "align": align_report,
                                                 "timings": timings, "device": device_name, "args": vars(args)},
                                                indent=2, default=str) + "\n")
    print(report)


if __name__ == "__main__":
    main()
