"""Run-time memory of quantized Vim on CPU: RSS growth of a fresh process that loads a saved model and runs it once.

For a Vim-S-shaped model (hidden 384, 24 layers, 224x224 images, 197 tokens; random weights: memory does not depend
on values) the script saves, once, the float32 model and each format below, then measures every folder in a **fresh
Python process** (one per row, run one after another):

* RSS growth after ``from_pretrained`` and after one batch-1 forward (``torch.no_grad()``), from the RSS after
  importing torch / transformers / optimum_vim: the issue's metric ("raw"); it includes the pages of PyTorch's
  shared library that the first forward touches (about 15 MB of ``libtorch_cpu.so`` code, whatever the model's size);
* the same growth measured after a **warm-up** (a 1-layer, hidden-64 model of the same format loaded, run once and
  deleted before the baseline), which leaves what the model itself keeps: weights, caches, activation memory the
  allocator retains;
* the peak RSS growth over load + forward (``VmHWM``, reset before loading; after the warm-up),
* ``model.get_memory_footprint()`` and the CPU kernels' decode caches (``optimum_vim_kernels.cpu.cache_bytes()``).

Formats: W8A8 / W4A8 (RTN, per-tensor activations), W4 per channel and W4 g128 weight-only (RTN), 2-bit VQ (ViM-VQ's
2-bit layout: 8-bit indices over 4-dim fp16 codewords, a random codebook), each with the default CPU path (weights
decoded from the packed codes on every call) and, for the weight-only / VQ rows, with the opt-in fp32 decode cache
(``OPTIMUM_VIM_CPU_DECODE_CACHE=1``).

    python benchmarks/memory.py                     # Vim-S, every format
    python benchmarks/memory.py --model tiny --formats float32 w4 vq2

Linux only (reads ``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SIZES = {"tiny": 192, "small": 384, "base": 768}
SMOKE = dict(hidden_size=32, num_hidden_layers=2, d_state=4, patch_size=8, stride=8, image_size=32)
FORMATS = ("float32", "w8a8", "w4a8", "w4", "w4g128", "vq2")
CACHED = ("w4", "w4g128", "vq2")  # rows repeated with the opt-in decode cache


def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _load_and_run(folder: str, batch: int):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    loaded = _status_kb("VmRSS")
    c = model.config
    x = torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(pixel_values=x)
    return model, loaded


def child(folder: str, batch: int, warmup: str | None) -> dict:
    """Runs in the fresh process: (warm up on ``warmup``,) load ``folder``, one forward; RSS at each step (bytes)."""
    import gc

    from optimum_vim_kernels import cpu

    import optimum_vim  # noqa: F401

    torch.ones(64, 64) @ torch.ones(64, 64)  # BLAS / OpenMP pools exist before the baseline
    if warmup:
        warm, _ = _load_and_run(warmup, batch)
        del warm
    gc.collect()
    base = _status_kb("VmRSS")
    peak_ok = _reset_peak()
    model, loaded = _load_and_run(folder, batch)
    gc.collect()
    ran = _status_kb("VmRSS")
    peak = _status_kb("VmHWM")
    return {"base": base * 1024, "load": (loaded - base) * 1024, "run": (ran - base) * 1024,
            "peak": (peak - base) * 1024 if peak_ok else float("nan"),
            "footprint": model.get_memory_footprint(), "cache": cpu.cache_bytes()}


def _vq_plan(model, codebook_dtype="float16"):
    """ViM-VQ's 2-bit layout on every block linear: 8-bit indices over 4-dim codewords (random values)."""
    from optimum_vim.models.family import get_family
    from optimum_vim.primitives import pack_codes
    from optimum_vim.recipes import LayerPlan, QuantPlan

    BLOCK_LINEARS = get_family("vim").default_linear_roles

    plan = QuantPlan(recipe="vimvq")
    g = torch.Generator().manual_seed(0)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
            k, n = mod.in_features, mod.out_features
            spec = {"type": "linear", "in_features": k, "out_features": n, "bias": mod.bias is not None,
                    "weight": {"format": "vq", "index_bits": 8, "vector_dim": 4, "codebook_size": 256,
                               "codebook_dtype": codebook_dtype}}
            tensors = {"qweight": pack_codes(torch.randint(0, 256, (n, -(-k // 4)), generator=g), 8),
                       "codebook": (torch.randn(256, 4, generator=g) * mod.weight.std()).to(torch.float16)}
            if mod.bias is not None:
                tensors["bias"] = mod.bias.detach().float()
            plan.layers[name] = LayerPlan(spec, tensors)
    return plan


def _quantized_copy(fp, fmt: str):
    """``fmt`` applied to a copy of the float model ``fp`` through the recipes' plan path."""
    import copy

    from optimum_vim import ViMQuantizationConfig, quantize_model
    from optimum_vim.quantizer import ViMHfQuantizer
    from optimum_vim.recipes import apply_plan

    model = copy.deepcopy(fp)
    if fmt == "vq2":  # the layout of ViM-VQ W2 with random codewords (k-means on Vim-S would take many minutes)
        cfg = ViMQuantizationConfig(recipe="vimvq", weight_bits=2)
        model.hf_quantizer = ViMHfQuantizer(cfg, pre_quantized=False)
        plan = _vq_plan(model)
        apply_plan(model, plan)
        cfg.layers = plan.specs()
        cfg.calibration_source = "none (random codebooks: a memory benchmark)"
        model.config.quantization_config = cfg
        model.is_quantized = True
        model.quantization_method = cfg.quant_method
        return model
    c = model.config
    calib = torch.randn(8, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(1))
    data = dict(calibration_dataset=calib, calibration_batch_size=8, num_calibration_samples=8)
    configs = {"w8a8": dict(weight_bits=8, act_bits=8, **data), "w4a8": dict(weight_bits=4, act_bits=8, **data),
               "w4": dict(weight_bits=4), "w4g128": dict(weight_bits=4, weight_group_size=128)}
    return quantize_model(model, ViMQuantizationConfig(**configs[fmt]))


def save_models(size: str, formats, root: Path) -> dict[str, tuple[Path, Path]]:
    """Saves the float model, each quantized format and their 1-layer warm-up twins under ``root``; returns
    ``{format: (folder, warm-up folder)}`` (folders saved by an earlier run with the same ``root`` are reused)."""
    from optimum_vim import VimConfig, VimForImageClassification

    if size == "smoke":  # a check that the script works (tests), not a measurement
        shapes = {"model": SMOKE, "warmup": {**SMOKE, "num_hidden_layers": 1}}
    else:
        shapes = {"model": dict(hidden_size=SIZES[size], num_hidden_layers=24),
                  "warmup": dict(hidden_size=64, num_hidden_layers=1)}
    folders = {fmt: (root / fmt, root / f"{fmt}-warmup") for fmt in formats}
    for which, shape in shapes.items():
        todo = [f for f in formats if not (folders[f][which == "warmup"] / "config.json").is_file()]
        if not todo:
            continue
        torch.manual_seed(0)
        fp = VimForImageClassification(VimConfig(**shape)).eval()
        for fmt in todo:
            model = fp if fmt == "float32" else _quantized_copy(fp, fmt)
            model.save_pretrained(folders[fmt][which == "warmup"])
    return folders


def measure(folder: Path, warmup: Path | None, batch: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--batch", str(batch)]
    if warmup is not None:
        cmd += ["--warmup", str(warmup)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"child for {folder} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=[*SIZES, "smoke"])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-cache-rows", action="store_true", help="skip the rows with the opt-in decode cache")
    p.add_argument("--workdir", help="keep the saved models here and reuse them on the next run (default: a temporary "
                   "folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--warmup", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.warmup)))
        return 0
    from optimum_vim_kernels.cpu_features import describe_cpu

    print(describe_cpu())
    shape = "smoke-test sizes" if args.model == "smoke" else \
        f"Vim-{args.model[0].upper()} (hidden {SIZES[args.model]}, 24 layers)"
    print(f"torch {torch.__version__}; {shape}, batch {args.batch}; one fresh process per row\n")
    formats = ["float32"] + [f for f in args.formats if f != "float32"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = save_models(args.model, formats, Path(args.workdir or tmp) / args.model)
        base_env = {k: v for k, v in os.environ.items() if k != "OPTIMUM_VIM_CPU_DECODE_CACHE"}
        rows = [(fmt, "packed (default)", base_env) for fmt in formats]
        if not args.no_cache_rows:
            rows += [(fmt, "fp32 decode cache (opt-in)", {**base_env, "OPTIMUM_VIM_CPU_DECODE_CACHE": "1"})
                     for fmt in formats if fmt in CACHED]
        print("| format | CPU weights | checkpoint (MB) | raw: load (MB) | raw: load + forward (MB) | raw vs float | "
              "warm: load + forward (MB) | warm vs float | warm: peak (MB) | get_memory_footprint (MB) | "
              "decode caches (MB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        mb = 1 / 2**20
        float_raw = float_warm = None
        for fmt, mode, env in rows:
            folder, warm_folder = folders[fmt]
            raw = measure(folder, None, args.batch, env)
            warm = measure(folder, warm_folder, args.batch, env)
            ckpt = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            float_raw, float_warm = float_raw or raw["run"], float_warm or warm["run"]
            print(f"| {fmt} | {mode if fmt != 'float32' else '-'} | {ckpt * mb:.2f} | {raw['load'] * mb:.1f} | "
                  f"{raw['run'] * mb:.1f} | {raw['run'] / float_raw:.2f}x | {warm['run'] * mb:.1f} | "
                  f"{warm['run'] / float_warm:.2f}x | {warm['peak'] * mb:.1f} | {warm['footprint'] * mb:.2f} | "
                  f"{warm['cache'] * mb:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
