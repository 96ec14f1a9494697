"""CPU speed of quantized Vim against the float model, side by side in one run.

For the bundled Fashion-MNIST fixture (real quantized checkpoints: RTN W8A8 / W4A8 / W4, 2-bit k-means VQ) and for
Vim-T shapes (24 layers, hidden 192, random weights, the formats of ``benchmarks/gpu_kernels.py``) at batch 1 and 64,
prints the end-to-end forward time of

* the float32 model, and each format under ``OPTIMUM_VIM_KERNELS=reference`` (fake-quant reference: fp64 integer
  sums, weights decoded on every call) and ``auto`` (the CPU kernel family: ``torch._int_mm``, cached decodings),

then the per-op split of one forward under ``auto``: the block linears (their input quantizers timed apart), the
selective scans, and the rest (conv, norms, gates, patch embedding, head). Times are medians of interleaved repeats
(every model runs once per round, so drifting machine load hits all of them alike) after warm-up, with
``torch.get_num_threads()`` intra-op threads.

    python benchmarks/cpu.py                                  # fixture and Vim-T, batch 1 and 64
    python benchmarks/cpu.py --shapes fixture --batches 64 --repeats 5
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "checkpoints" / "vim-fashion-mnist"


def _gpu_benchmark_module():
    spec = importlib.util.spec_from_file_location("optimum_vim_gpu_benchmark", HERE / "gpu_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fixture_models(num_samples: int) -> dict:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from optimum_vim import ViMQuantizationConfig
    from optimum_vim.evaluation import load_named_dataset

    calib = load_named_dataset("fashion-mnist", "train")
    proc = AutoImageProcessor.from_pretrained(FIXTURE)
    data = dict(calibration_dataset=calib, image_processor=proc, num_calibration_samples=num_samples)
    configs = {
        "W8A8 (RTN)": dict(recipe="rtn", weight_bits=8, act_bits=8, **data),
        "W4A8 (RTN)": dict(recipe="rtn", weight_bits=4, act_bits=8, **data),
        "W4 (RTN, weight-only)": dict(recipe="rtn", weight_bits=4),
        "VQ W2 (k-means)": dict(recipe="vimvq", weight_bits=2, recipe_args={"convex": False, "incremental": False}),
    }
    models = {"float32": AutoModelForImageClassification.from_pretrained(FIXTURE).eval()}
    for label, cfg in configs.items():
        models[label] = AutoModelForImageClassification.from_pretrained(
            FIXTURE, quantization_config=ViMQuantizationConfig(**cfg)).eval()
    return models


def vim_t_models() -> dict:
    gpu = _gpu_benchmark_module()
    fp = gpu.build("tiny", smoke=False)
    models = {"float32": fp}
    for label, fmt in (("W8A8 (int8 scan inputs)", "w8a8"), ("W4A8 (int8 scan inputs)", "w4a8"),
                       ("W4 g128 (weight-only)", "w4a16"), ("VQ W2 (8-bit indices, d=4)", "vq2")):
        models[label] = gpu.quantized(fp, fmt, torch.device("cpu"), torch.float32, smoke=False).eval()
    return models


def _pixels(model, batch: int) -> torch.Tensor:
    c = model.config
    return torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))


def time_models(models: dict, batch: int, repeats: int, warmup: int = 2) -> dict:
    """Median forward seconds per (label, policy), rounds interleaved over every entry."""
    from optimum_vim.ops.dispatch import use_kernels

    runs = [("float32", "auto")] + [(k, p) for k in models if k != "float32" for p in ("reference", "auto")]
    x = _pixels(models["float32"], batch)
    times = collections.defaultdict(list)
    with torch.no_grad():
        for r in range(warmup + repeats):
            for label, policy in runs:
                with use_kernels(policy):
                    start = time.perf_counter()
                    models[label](pixel_values=x)
                    if r >= warmup:
                        times[(label, policy)].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in times.items()}


class _Split:
    """Forward-hook timers: block linears (and, inside them, their input quantizers), scans, total."""

    def __init__(self, model):
        from optimum_vim.models.vim.modeling_vim import VimSelectiveScan
        from optimum_vim.modules import QActivation, QLinear, QSelectiveScan
        from optimum_vim.recipes import BLOCK_LINEARS

        self.seconds = collections.Counter()
        self.handles, self.patched = [], []
        for name, mod in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, (torch.nn.Linear, QLinear)) and leaf in BLOCK_LINEARS:
                self._hook(mod, "block linears (quantizers + GEMM)")
            elif isinstance(mod, (VimSelectiveScan, QSelectiveScan)):
                self._hook(mod, "selective scans")
            if isinstance(mod, QLinear) and isinstance(mod.input_quantizer, QActivation):
                self._wrap(mod.input_quantizer, "row_quantize", "  of which input quantizers")
                self._wrap(mod.input_quantizer, "forward", "  of which input quantizers")
        import optimum_vim.modules.linear as linear_mod

        self._wrap(linear_mod, "combine_directions", "  of which input quantizers")

    def _hook(self, mod, key):
        starts = []
        self.handles.append(mod.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))
        self.handles.append(mod.register_forward_hook(
            lambda *_: self.seconds.update({key: time.perf_counter() - starts.pop()})))

    def _wrap(self, owner, attr, key):
        real = getattr(owner, attr)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.seconds[key] += time.perf_counter() - start

        setattr(owner, attr, timed)
        self.patched.append((owner, attr, real))

    def close(self):
        for h in self.handles:
            h.remove()
        for owner, attr, real in reversed(self.patched):
            if isinstance(owner, torch.nn.Module):
                delattr(owner, attr)  # the instance attribute shadowed the class method
            else:
                setattr(owner, attr, real)


def op_split(model, batch: int, repeats: int) -> dict:
    x = _pixels(model, batch)
    with torch.no_grad():
        model(pixel_values=x)
        split = _Split(model)
        try:
            start = time.perf_counter()
            for _ in range(repeats):
                model(pixel_values=x)
            total = time.perf_counter() - start
        finally:
            split.close()
    out = {k: v / repeats for k, v in split.seconds.items()}
    out["total"] = total / repeats
    out["rest (conv, norms, gates, embed, head)"] = out["total"] - out.get("block linears (quantizers + GEMM)", 0) \
        - out.get("selective scans", 0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["fixture", "vim-t"], choices=["fixture", "vim-t"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--vim-t-batch", type=int, default=None, help="batch used for Vim-T instead of 64 (slow on CPU)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration images of the fixture's RTN rows")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in args.shapes:
        models = fixture_models(args.num_samples) if shape == "fixture" else vim_t_models()
        batches = args.batches if shape == "fixture" or args.vim_t_batch is None else \
            [b if b == 1 else args.vim_t_batch for b in args.batches]
        for batch in batches:
            t = time_models(models, batch, args.repeats if batch > 1 or shape == "fixture" else max(args.repeats, 10))
            fp = t[("float32", "auto")]
            print(f"\n### {shape}, batch {batch}: end-to-end forward (median of {args.repeats})\n")
            print("| format | reference (ms) | CPU kernels (ms) | speed-up vs float (CPU kernels) | vs reference |")
            print("|---|---|---|---|---|")
            print(f"| float32 | - | {fp * 1e3:.1f} | 1.00x | - |")
            for label in models:
                if label == "float32":
                    continue
                ref, fast = t[(label, "reference")], t[(label, "auto")]
                print(f"| {label} | {ref * 1e3:.1f} | {fast * 1e3:.1f} | {fp / fast:.2f}x | {ref / fast:.2f}x |")
            if batch == max(batches):
                print(f"\n### {shape}, batch {batch}: per-op split of one forward (ms, CPU kernels)\n")
                splits = {label: op_split(m, batch, max(1, args.repeats // 2)) for label, m in models.items()}
                keys = ["block linears (quantizers + GEMM)", "  of which input quantizers", "selective scans",
                        "rest (conv, norms, gates, embed, head)", "total"]
                print("| part | " + " | ".join(splits) + " |")
                print("|---|" + "---|" * len(splits))
                for key in keys:
                    print(f"| {key.strip()} | " + " | ".join(f"{s.get(key, 0) * 1e3:.1f}" for s in splits.values()) + " |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
