"""OuroMamba-Gen images next to real ones: a PNG grid (top rows synthetic, bottom rows real training images) and the
float model's predictions on both.

    python benchmarks/ouromamba_images.py --out ouromamba_images.png                 # 16 images, 1000 iterations
    python benchmarks/ouromamba_images.py --num 8 --iterations 200 --out /tmp/g.png  # quick look
    python benchmarks/ouromamba_images.py --no-priors --out plain.png               # the paper's loss alone
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim
from optimum_vim.evaluation import load_named_dataset
from optimum_vim.recipes.ouromamba.generation import to_pil_images

FIXTURE = Path(__file__).resolve().parents[1] / "checkpoints" / "vim-fashion-mnist"


def _grid(images, cols: int, scale: int):
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w * scale + (cols - 1) * 2, rows * h * scale + (rows - 1) * 2), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(im.convert("RGB").resize((w * scale, h * scale), Image.NEAREST), (c * (w * scale + 2), r * (h * scale + 2)))
    return sheet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--patch-size", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=4, help="pixel upscaling in the PNG")
    ap.add_argument("--out", default="ouromamba_images.png")
    ap.add_argument("--no-priors", action="store_true",
                    help="generate without the image priors (jitter, flip, total variation): the paper's loss alone")
    args = ap.parse_args(argv)

    model = AutoModelForImageClassification.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    start = time.perf_counter()
    synth, targets = optimum_vim.generate_calibration_images(
        model, args.num, iterations=args.iterations, patch_size=args.patch_size, processor=processor, seed=args.seed,
        return_targets=True, **(dict(jitter=0, flip=False, tv_weight=0.0) if args.no_priors else {}),
    )
    seconds = time.perf_counter() - start
    real = load_named_dataset(args.dataset, "train", limit=args.num)
    real_px = processor(images=[r["image"] for r in real], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        p_synth = model(pixel_values=synth).logits.softmax(-1)
        p_real = model(pixel_values=real_px).logits.softmax(-1)
    synth_pil = to_pil_images(synth, processor)
    real_pil = to_pil_images(real_px, processor)
    cols = min(args.num, 8)
    gap = [synth_pil[0].copy().point(lambda _: 255)] * ((-args.num) % cols + cols)
    _grid(synth_pil + gap + real_pil, cols, args.scale).save(args.out)
    names = model.config.id2label
    hit = (p_synth.argmax(-1) == targets).float().mean().item()
    print(f"{args.num} synthetic images, {args.iterations} iterations: {seconds:.1f} s "
          f"({torch.get_num_threads()} threads); target class reached on {hit:.0%}")
    print(f"mean target probability {p_synth.gather(1, targets[:, None]).mean():.3f}; real images: mean top "
          f"probability {p_real.max(-1).values.mean():.3f}")
    print("targets:", ", ".join(names[int(t)] for t in targets[:cols]))
    print(f"grid (top: synthetic, bottom: real {args.dataset} train) -> {args.out}")


if __name__ == "__main__":
    main()
