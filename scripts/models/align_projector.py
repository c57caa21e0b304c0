#!/usr/bin/env python
"""Stage-1 feature alignment (LLaVA-1.5's pretraining stage) for smol-llava.

Only the projector (``model.multi_modal_projector``) trains; the EfficientNet tower and SmolLM2
stay frozen. The data are generated image-caption pairs: 224x224 pictures of one to three coloured
shapes on a plain background, captioned from their colours, shapes, sizes and grid positions
("A large red circle in the top left and a small blue square in the center."). The conversation is
``user: <image> + "Describe the image briefly."`` / ``assistant: caption``; the loss covers the
caption and ``<|im_end|>`` only.

Outputs (in ``--out``):
  projector.safetensors   the trained projector (load with ``load_model("smol-llava",
                          projector_path=OUT)`` or ``smol_llava.load_projector``)
  losses.jsonl            one line per step: step, loss, lr, seconds
  loss_curve.png          the loss curve (raw and smoothed)
  report.json, report.md  settings, timings, held-out caption accuracy before/after, sample captions

GPU run (the lead's): python scripts/models/align_projector.py --model smol-llava --steps 600
    --batch-size 64 --lr 1e-3 --out runs/align
  (on the GPU machine, set ASYMLORA_WEIGHTS_DIR=/root/models; see shared/tools/stage_for_device.sh)
CPU smoke test: python scripts/models/align_projector.py --model tiny-llava --max-steps 2 --out /tmp/align
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without install

from asymlora.models import ModelLoadError, load_model  # noqa: E402

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
}
BACKGROUNDS = {"grey": (128, 128, 128), "light": (225, 225, 215), "dark": (45, 45, 55)}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
PROMPT = "Describe the image briefly."


def _position_name(r: int, c: int) -> str:
    if r == 1 and c == 1:
        return "the center"
    if r == 1:
        return f"the middle {COLS[c]}"
    if c == 1:
        return f"the {ROWS[r]} center"
    return f"the {ROWS[r]} {COLS[c]}"


def make_example(rng: random.Random, size: int = 224):
    """One generated picture and its caption, plus the (color, shape) pairs it shows."""
    bg_name = rng.choice(list(BACKGROUNDS))
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg_name])
    draw = ImageDraw.Draw(img)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], k=rng.randint(1, 3))
    cell = size / 3
    parts, objects = [], []
    for r, c in sorted(cells):
        color = rng.choice([k for k in COLORS if not (bg_name == "dark" and k == "black")
                            and not (bg_name == "light" and k == "white")])
        shape = rng.choice(SHAPES)
        large = rng.random() < 0.5
        half = cell * (0.42 if large else 0.24)
        cx = (c + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
        cy = (r + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell
        box = [cx - half, cy - half, cx + half, cy + half]
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLORS[color])
        parts.append(f"a {'large' if large else 'small'} {color} {shape} in {_position_name(r, c)}")
        objects.append((color, shape))
    caption = " and ".join(parts)
    caption = caption[0].upper() + caption[1:] + "."
    return img, caption, objects


_PROMPT_LEN: dict[str, int] = {}


def build_batch(processor, model, examples):
    """Tokenise (image, caption) pairs; labels cover the caption and <|im_end|> only."""
    image_token_id = model.config.image_token_id
    pad_id = processor.tokenizer.pad_token_id
    prompts, fulls = [], []
    for _, caption, _ in examples:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
        prompts.append(prompt)
        fulls.append(prompt + caption + processor.tokenizer.eos_token)
    images = [ex[0] for ex in examples]
    batch = processor(text=fulls, images=images, return_tensors="pt", padding=True)
    prompt_lens = []
    for p, im in zip(prompts, images):  # every prompt is the same string: tokenise it once
        if p not in _PROMPT_LEN:
            _PROMPT_LEN[p] = len(processor(text=[p], images=[im], return_tensors="pt")["input_ids"][0])
        prompt_lens.append(_PROMPT_LEN[p])
    labels = batch["input_ids"].clone()
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = -100
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == image_token_id] = -100
    if pad_id is not None:
        labels[batch["input_ids"] == pad_id] = -100
    batch["labels"] = labels
    return batch


@torch.no_grad()
def caption_samples(model, processor, examples, device, max_new_tokens: int = 40, autocast=None):
    """Greedy captions for held-out examples and how many (color, shape) pairs each names."""
    model.eval()
    out = []
    for img, caption, objects in examples:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
        batch = processor(text=[prompt], images=[img], return_tensors="pt").to(device)
        with autocast():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.decode(gen[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        low = text.lower()
        hits = sum(1 for color, shape in objects if f"{color} {shape}" in low)
        out.append({"reference": caption, "generated": text, "objects": len(objects), "named": hits})
    return out


def _accuracy(samples) -> float:
    total = sum(s["objects"] for s in samples)
    return sum(s["named"] for s in samples) / max(total, 1)


def _plot(losses, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in losses]
    vals = [r["loss"] for r in losses]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, vals, alpha=0.35, label="loss")
    if len(vals) >= 10:
        k = max(5, len(vals) // 20)
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("caption loss")
    ax.set_title("stage-1 projector alignment")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smol-llava", help="smol-llava, tiny-llava or a local LLaVA folder")
    p.add_argument("--out", default="runs/align_projector", help="output folder")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps (smoke tests: --max-steps 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (LLaVA-1.5 stage 1: 1e-3)")
    p.add_argument("--warmup", type=float, default=0.03, help="warmup fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-samples", type=int, default=16, help="held-out images captioned before/after")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    steps = args.steps if args.max_steps is None else min(args.steps, args.max_steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    use_bf16 = (device.type == "cuda") if args.bf16 is None else args.bf16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    try:
        model, processor = load_model(args.model, dtype=torch.float32)
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    load_s = time.time() - t0
    model.to(device)
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    params = [p for p in projector.parameters()]
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device.type, enabled=False)

    eval_rng = random.Random(10_000 + args.seed)
    eval_set = [make_example(eval_rng) for _ in range(args.eval_samples)]
    t = time.time()
    before = caption_samples(model, processor, eval_set, device, args.max_new_tokens, autocast)
    eval_before_s = time.time() - t

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    warm = max(1, int(round(args.warmup * steps)))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay (LLaVA-1.5's schedule)
        if step < warm:
            return args.lr * (step + 1) / warm
        prog = (step - warm) / max(1, steps - warm)
        return args.lr * 0.5 * (1 + math.cos(math.pi * prog))

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    losses = []
    log = open(out / "losses.jsonl", "w")
    t_train = time.time()
    for step in range(steps):
        model.train()
        ts = time.time()
        batch = build_batch(processor, model, [make_example(rng) for _ in range(args.batch_size)]).to(device)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "loss": float(loss.detach()), "lr": lr_at(step), "seconds": time.time() - ts}
        losses.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['seconds']:.2f}s", flush=True)
    log.close()
    train_s = time.time() - t_train

    t = time.time()
    after = caption_samples(model, processor, eval_set, device, args.max_new_tokens, autocast)
    eval_after_s = time.time() - t

    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()},
              str(out / "projector.safetensors"), metadata={"model": str(args.model), "steps": str(steps)})
    plotted = _plot(losses, out / "loss_curve.png")

    first = float(np.mean([r["loss"] for r in losses[: max(1, len(losses) // 10)]])) if losses else float("nan")
    last = float(np.mean([r["loss"] for r in losses[-max(1, len(losses) // 10):]])) if losses else float("nan")
    report = {
        "model": str(args.model), "device": str(device), "bf16": use_bf16, "steps": steps,
        "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": warm, "seed": args.seed,
        "trainable_params": n_train, "total_params": n_total,
        "load_seconds": load_s, "train_seconds": train_s,
        "seconds_per_step": train_s / max(steps, 1),
        "eval_seconds_before": eval_before_s, "eval_seconds_after": eval_after_s,
        "loss_first_10pct": first, "loss_last_10pct": last,
        "caption_object_accuracy_before": _accuracy(before), "caption_object_accuracy_after": _accuracy(after),
        "samples_before": before, "samples_after": after,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Stage-1 projector alignment: {args.model}", "",
        f"- device {device}, bf16 {use_bf16}, {steps} steps x batch {args.batch_size}, lr {args.lr} "
        f"(warmup {warm}, cosine), seed {args.seed}",
        f"- trainable {n_train:,} of {n_total:,} parameters (projector only; tower and LM frozen)",
        f"- load {load_s:.1f}s, train {train_s:.1f}s ({report['seconds_per_step']:.3f}s/step)",
        f"- loss: first 10% {first:.4f} -> last 10% {last:.4f}",
        f"- held-out captions naming each object's colour+shape: {_accuracy(before):.1%} before, "
        f"{_accuracy(after):.1%} after ({sum(s['objects'] for s in after)} objects in {len(after)} images)",
        "", "![loss curve](loss_curve.png)" if plotted else "(matplotlib missing: no plot)", "",
        "| reference | before | after |", "|---|---|---|",
    ]
    for b, a in zip(before, after):
        cell = lambda s: s.replace("|", "/").replace("\n", " ")  # noqa: E731
        lines.append(f"| {cell(b['reference'])} | {cell(b['generated'])} | {cell(a['generated'])} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"loss {first:.4f} -> {last:.4f}; caption accuracy {_accuracy(before):.1%} -> {_accuracy(after):.1%}; "
          f"report in {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
