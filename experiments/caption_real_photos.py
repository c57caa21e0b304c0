"""Captions of scikit-image's real photos by smol-llava with the aligned projector (CPU is fine).

    python experiments/caption_real_photos.py [--projector experiments/results/smol_llava_stage1/align]

Stage 1 aligned the projector on generated shapes only; this shows what it does on photographs.
Writes the markdown table to stdout.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "horse", "camera"]


def main() -> None:
    from PIL import Image
    from skimage import data

    from asymlora.evaluate.generation import build_prompt
    from asymlora.models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--projector", default=str(ROOT / "experiments/results/smol_llava_stage1/align"))
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args()
    rows = ["| photo | before alignment (random projector) | after stage 1 |", "|---|---|---|"]
    captions = {}
    for label, kwargs in (("before", {}), ("after", {"projector_path": args.projector})):
        model, processor = load_model("smol-llava", **kwargs)
        model.eval()
        for name in PHOTOS:
            array = getattr(data, name)()
            image = Image.fromarray(array).convert("RGB")
            text = build_prompt(processor, "Describe the image.", has_image=True)
            inputs = processor(text=[text], images=[image], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            captions.setdefault(name, {})[label] = " ".join(answer.split())
    for name in PHOTOS:
        rows.append(f"| {name} | {captions[name]['before']} | {captions[name]['after']} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
