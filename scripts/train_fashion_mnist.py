"""Train the bundled fixture: a small Vision Mamba (real Vim architecture) on Fashion-MNIST, on CPU.

Example (the command that produced ``checkpoints/vim-fashion-mnist``)::

    python scripts/train_fashion_mnist.py --output checkpoints/vim-fashion-mnist --epochs 5 --seed 0 --threads 2

Trains on the full 60k training split with a fixed schedule (no model selection), then evaluates once on the
10k test split and writes an HF folder (config, safetensors, preprocessor config, model card).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import optimum_vim  # noqa: F401 - registers the vim model type
from optimum_vim import VimConfig, VimForImageClassification, VimImageProcessor
from optimum_vim.data import FASHION_MNIST_LABELS, load_fashion_mnist_arrays
from optimum_vim.hub import set_card_info

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-split pixel statistics (0..1 scale)


def card_training_info(record: dict) -> dict:
    """The model card's training table from a training record."""
    return {
        "data": "Fashion-MNIST (Zalando, MIT), 60,000 training images; evaluated on the 10,000-image test split",
        "command": record["command"],
        "seed": record["seed"],
        "wall": f"{record['train_wall_seconds'] / 60:.1f} min on {record['threads']} CPU threads (torch {record['torch']})",
        "accuracy": f"{100 * record['test_accuracy']:.2f}% ({record['test_images']} images)",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the trained model (HF format)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--d-state", type=int, default=8)
    p.add_argument("--expand", type=int, default=1)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke runs)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package path)")
    return p.parse_args(argv)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(images).float() / 255.0 - MEAN) / STD).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to 2 px (zero-padded crop) and horizontal flip, per image."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-MEAN / STD)
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(28)[None, :])[:, None, :, None].expand(n, 1, 28, 32)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(28)[None, :])[:, None, None, :].expand(n, 1, 28, 28)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for i in tqdm(range(0, len(x), batch_size), desc="test", leave=False):
        correct += (model(x[i : i + batch_size]).logits.argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / len(x)


def load_splits(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST train / test images (normalised, (N, 1, 28, 28)) and labels; ``args.limit`` cuts the train split."""
    train_x, train_y = load_fashion_mnist_arrays("train", args.data_dir)
    test_x, test_y = load_fashion_mnist_arrays("test", args.data_dir)
    if args.limit:
        train_x, train_y = train_x[: args.limit], train_y[: args.limit]
    xtr, ytr = to_tensor(train_x), torch.from_numpy(train_y)
    xte, yte = to_tensor(test_x), torch.from_numpy(test_y)
    return xtr, ytr, xte, yte


def train(model, xtr: torch.Tensor, ytr: torch.Tensor, args) -> list[float]:
    """The fixtures' training loop: AdamW (no weight decay on biases, norms, ``A_log`` and D), linear warm-up then
    cosine decay, seeded shuffles and augmentation, label smoothing, gradient clipping at 1. Returns the wall seconds
    of each epoch."""

    def decays(name: str, p) -> bool:
        return p.dim() >= 2 and "A_log" not in name and "A_b_log" not in name

    params = list(model.named_parameters())
    opt = torch.optim.AdamW([
        {"params": [p for n, p in params if decays(n, p)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
    ], lr=args.lr)
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    total = steps_per_epoch * args.epochs

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))

    gen = torch.Generator().manual_seed(args.seed)
    start, step, epoch_seconds = time.time(), 0, []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=10)
        running = 0.0
        for i in bar:
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            xb = augment(xtr[idx], gen)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = model(xb).logits
            loss = F.cross_entropy(logits, ytr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if i else loss.item()
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr_at(step):.2e}", refresh=False)
        epoch_seconds.append(round(time.time() - start - sum(epoch_seconds), 1))
        print(f"epoch {epoch + 1}: loss {running:.4f}, {time.time() - start:.0f}s elapsed", flush=True)
    return epoch_seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    xtr, ytr, xte, yte = load_splits(args)

    config = VimConfig(
        hidden_size=args.hidden_size, num_hidden_layers=args.depth, d_state=args.d_state, expand=args.expand,
        patch_size=args.patch_size, stride=args.stride, image_size=28, num_channels=1,
        num_labels=10, id2label=dict(enumerate(FASHION_MNIST_LABELS)),
        label2id={name: i for i, name in enumerate(FASHION_MNIST_LABELS)},
    )
    model = VimForImageClassification(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters, {config.sequence_length} tokens", flush=True)

    start = time.time()
    train(model, xtr, ytr, args)
    train_seconds = time.time() - start
    accuracy = evaluate(model, xte, yte)
    print(f"test accuracy (10,000 images): {accuracy:.4f}; training wall time {train_seconds:.0f}s", flush=True)

    command = "python scripts/train_fashion_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {
        "command": command, "seed": args.seed, "threads": args.threads, "epochs": args.epochs,
        "train_wall_seconds": round(train_seconds, 1), "test_accuracy": accuracy, "test_images": len(xte),
        "parameters": n_params, "torch": torch.__version__,
    }
    set_card_info(model, training=card_training_info(record))
    model.save_pretrained(out_dir)
    processor = VimImageProcessor(
        size={"height": 28, "width": 28}, do_center_crop=False, image_mean=[MEAN], image_std=[STD], color_mode="L",
        resample=2,
    )
    processor.save_pretrained(out_dir)
    (out_dir / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
