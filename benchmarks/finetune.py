"""Fine-tuning a quantized fixture recovers accuracy: before / after rows (top-1, logit SQNR, agreement with float).

    python benchmarks/finetune.py [--setting rtn-w4a4] [--steps 300] [--seeds 0 1 2] [--lora]

The bundled Fashion-MNIST Vim is quantized (calibration: 128 seeded images of the fine-tuning subset of the training split), evaluated on the test split,
fine-tuned with transformers' ``Trainer`` on the training split (straight-through gradients through every quantizer,
weights frozen as codes; float parameters and quantization scales train), and evaluated again. With ``--lora``, a second
row trains LoRA adapters on the quantized linears (plus the head) instead. Rows at 4-bit activations give mean ± std
over the calibration seeds. Every number is measured in this run; the header names the CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

import optimum_vim  # noqa: F401
from optimum_vim import ViMQuantizationConfig
from optimum_vim.evaluation import iter_batches, load_named_dataset
from optimum_vim.training import enable_scale_training

FIXTURE = Path(__file__).resolve().parents[1] / "checkpoints" / "vim-fashion-mnist"
SETTINGS = {
    "rtn-w4a4": dict(recipe="rtn", weight_bits=4, act_bits=4),
    "rtn-w4a8": dict(recipe="rtn", weight_bits=4, act_bits=8),
    "vimvq-w1": dict(recipe="vimvq", weight_bits=1),
}


def logit_sqnr_db(fp: torch.Tensor, q: torch.Tensor) -> float:
    noise = (q.double() - fp.double()).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(fp.double().pow(2).sum().item() / noise)


@torch.no_grad()
def logits_on(model, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(pixels[i : i + batch]).logits.float() for i in range(0, len(pixels), batch)])


def tensors(dataset, processor):
    xs, ys = [], []
    for x, y in iter_batches(dataset, processor, 1000):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def measure(model, test_x, test_y, fp_logits) -> dict:
    logits = logits_on(model, test_x)
    pred = logits.argmax(-1)
    return {"top1": (pred == test_y).float().mean().item(), "sqnr": logit_sqnr_db(fp_logits, logits),
            "agree": (pred == fp_logits.argmax(-1)).float().mean().item()}


def finetune(model, train_x, train_y, steps: int, lr: float, seed: int, batch: int) -> float:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                                 lr_scheduler_type="cosine", warmup_steps=steps // 10, weight_decay=0.0,
                                 report_to=[], use_cpu=True, save_strategy="no", seed=seed, logging_steps=50,
                                 disable_tqdm=True, dataloader_num_workers=0)
        Trainer(model=model, args=args, train_dataset=_Pairs(train_x, train_y)).train()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="rtn-w4a4", choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning learning rate (LoRA: 10x)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lora", action="store_true", help="add a LoRA row (adapters on the quantized linears)")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    parser.add_argument("--train-limit", type=int, default=10000, help="fine-tune on the first N training images")
    args = parser.parse_args(argv)

    from optimum_vim_kernels.cpu_features import describe_cpu

    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    processor = AutoImageProcessor.from_pretrained(FIXTURE)
    train = load_named_dataset("fashion-mnist", "train", args.train_limit)  # calibration draws from it too
    test_x, test_y = tensors(load_named_dataset("fashion-mnist", "test", args.test_limit), processor)
    train_x, train_y = tensors(train, processor)
    fp = AutoModelForImageClassification.from_pretrained(FIXTURE)
    fp_logits = logits_on(fp, test_x)
    fp_top1 = (fp_logits.argmax(-1) == test_y).float().mean().item()
    print(f"float: {100 * fp_top1:.2f}% on {len(test_y)} test images", flush=True)

    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        kinds = ["full"] + (["lora"] if args.lora else [])
        for kind in kinds:
            cfg = ViMQuantizationConfig(**SETTINGS[args.setting], calibration_dataset=train, seed=seed,
                                        image_processor=processor)
            q = AutoModelForImageClassification.from_pretrained(FIXTURE, quantization_config=cfg)
            before = measure(q, test_x, test_y, fp_logits)
            if kind == "full":
                enable_scale_training(q, codebook=SETTINGS[args.setting]["recipe"] == "vimvq")
                model, lr = q, args.lr
            else:
                from optimum_vim.training import add_lora

                model, lr = add_lora(q, r=8, lora_alpha=16, modules_to_save=["head"]), 10 * args.lr
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            seconds = finetune(model, train_x, train_y, args.steps, lr, seed, args.batch_size)
            after = measure(model, test_x, test_y, fp_logits)
            rows.setdefault(kind, []).append({"before": before, "after": after, "seconds": seconds,
                                              "trainable": trainable})
            print(f"seed {seed} {kind}: {100 * before['top1']:.2f}% -> {100 * after['top1']:.2f}%, SQNR "
                  f"{before['sqnr']:.2f} -> {after['sqnr']:.2f} dB, agreement {100 * before['agree']:.2f}% -> "
                  f"{100 * after['agree']:.2f}% ({seconds:.0f} s, {trainable:,} trainable)", flush=True)

    def stat(values, pct=True):
        scale = 100 if pct else 1
        if len(values) == 1:
            return f"{scale * values[0]:.2f}"
        return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"

    print(f"\n{args.setting}, {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}, "
          f"{len(train_y)} training / {len(test_y)} test images (float {100 * fp_top1:.2f}%)\n")
    print("| fine-tuning | trainable params | top-1 before | top-1 after | SQNR before (dB) | SQNR after (dB) | "
          "agreement before | agreement after | train time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, rs in rows.items():
        label = "Trainer, float params + scales (STE)" if kind == "full" else "LoRA r=8 on quantized linears + head"
        def get(when, key, rs=rs):
            return [r[when][key] for r in rs]

        print(f"| {label} | {rs[0]['trainable']:,} | {stat(get('before', 'top1'))}% | {stat(get('after', 'top1'))}% | "
              f"{stat(get('before', 'sqnr'), False)} | {stat(get('after', 'sqnr'), False)} | "
              f"{stat(get('before', 'agree'))}% | {stat(get('after', 'agree'))}% | "
              f"{stat([r['seconds'] for r in rs], False)} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
