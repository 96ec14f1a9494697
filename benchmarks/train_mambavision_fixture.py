"""Train the second bundled fixture: a small MambaVision (the real hierarchical architecture: conv stem, two conv
stages, MambaVision-mixer + self-attention stages, downsamplers) on Fashion-MNIST, on CPU.

Example (the command that produced ``checkpoints/mambavision-fashion-mnist``, see its training_record.json)::

    nice -n 19 python benchmarks/train_mambavision_fixture.py --output checkpoints/mambavision-fashion-mnist \
        --epochs 4 --batch-size 256 --lr 3e-3 --warmup-steps 100 --seed 0 --threads 2

(30.7 min on 2 shared CPU threads, 89.56% top-1 on the test split.)

Same data, augmentation (2 px translation + horizontal flip), optimiser (AdamW, warm-up + cosine), label smoothing and
single final evaluation on the 10k test split as the Vim fixture (``scripts/train_fashion_mnist.py``, whose
helpers it imports). Images stay 28x28: the stem and the three downsamplers take them to 7, 4, 2 and 1 pixels, so the
stage-3 mixer / attention blocks see 4-token windows and stage 4 one token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from train_fashion_mnist import MEAN, STD, evaluate, load_splits, train  # noqa: E402

from optimum_vim.data import FASHION_MNIST_LABELS  # noqa: E402
from optimum_vim.models.mambavision import (  # noqa: E402
    MambaVisionConfig,
    MambaVisionForImageClassification,
    MambaVisionImageProcessor,
    register_mambavision_with_transformers,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the trained model (HF format)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=24)
    p.add_argument("--in-dim", type=int, default=16)
    p.add_argument("--depths", type=int, nargs=4, default=[1, 1, 2, 2])
    p.add_argument("--num-heads", type=int, nargs=4, default=[1, 1, 2, 4])
    p.add_argument("--window-size", type=int, nargs=4, default=[8, 8, 2, 1])
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke runs)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package path)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    register_mambavision_with_transformers()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    xtr, ytr, xte, yte = load_splits(args)

    config = MambaVisionConfig(
        dim=args.dim, in_dim=args.in_dim, depths=args.depths, num_heads=args.num_heads, window_size=args.window_size,
        mlp_ratio=args.mlp_ratio, drop_path_rate=0.0, image_size=28, num_channels=1, num_labels=10,
        id2label=dict(enumerate(FASHION_MNIST_LABELS)), label2id={n: i for i, n in enumerate(FASHION_MNIST_LABELS)},
    )
    model = MambaVisionForImageClassification(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    start = time.time()
    epoch_seconds = train(model, xtr, ytr, args)
    train_seconds = time.time() - start
    accuracy = evaluate(model, xte, yte)
    print(f"test accuracy (10,000 images): {accuracy:.4f}; training wall time {train_seconds:.0f}s", flush=True)

    command = "python benchmarks/train_mambavision_fixture.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {
        "command": command, "seed": args.seed, "threads": args.threads, "epochs": args.epochs,
        "epoch_wall_seconds": epoch_seconds, "train_wall_seconds": round(train_seconds, 1),
        "test_accuracy": accuracy, "test_images": len(xte), "parameters": n_params, "torch": torch.__version__,
    }
    model.save_pretrained(out_dir)
    MambaVisionImageProcessor(
        size={"height": 28, "width": 28}, do_center_crop=False, image_mean=[MEAN], image_std=[STD], color_mode="L",
        resample=2,
    ).save_pretrained(out_dir)
    (out_dir / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "README.md").write_text(
        "---\nlibrary_name: transformers\npipeline_tag: image-classification\nlicense: apache-2.0\n"
        "tags: [mambavision, vision-mamba, fashion-mnist, optimum-vim-fixture]\n---\n\n"
        f"# MambaVision Fashion-MNIST fixture\n\nA small MambaVision ({n_params:,} parameters; dim {args.dim}, depths "
        f"{args.depths}) trained from scratch on the 60,000 Fashion-MNIST training images (Zalando, MIT) by "
        f"`{command}` (seed {args.seed}, {train_seconds / 60:.1f} min on {args.threads} CPU threads, torch "
        f"{torch.__version__}). Top-1 on the 10,000 test images: {100 * accuracy:.2f}%. Load with `import "
        "optimum_vim` then `AutoModelForImageClassification.from_pretrained(...)`.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
