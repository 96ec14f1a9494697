"""CPU speed of quantized Vim against the float model, every CPU kernel path side by side in one run.

For the bundled Fashion-MNIST fixture (real quantized checkpoints: RTN W8A8 / W4A8 / W4, 2-bit k-means VQ) and for
Vim-T shapes (24 layers, hidden 192, random weights, the formats of ``benchmarks/gpu_kernels.py``) at batch 1 and 64,
prints the end-to-end forward time of

* the float32 model, and each format under ``OPTIMUM_VIM_KERNELS=reference`` (fake-quant reference: fp64 integer
  sums, weights decoded on every call) and ``auto`` (the CPU kernel family with its per-CPU choice), and
* each CPU path forced: ``int_mm`` and ``sgemm`` for the integer formats (``OPTIMUM_VIM_CPU_GEMM``), weights decoded
  per call (the default) and the opt-in fp32 decode cache for the weight-only / VQ formats;

then, for the largest batch, the **per-op GEMM times** (one call of each block linear of layer 0 on the activation
shape of that batch: ``nn.Linear`` against the quantized layer, input quantizer included, on each path), which stay
valid when the rest of the forward (the scan) gets faster, and the per-op split of one forward under ``auto`` (block
linears with their input quantizers timed apart, selective scans, the rest). Times are medians of interleaved repeats
(every variant runs once per round, so drifting machine load hits all of them alike) after warm-up, with
``torch.get_num_threads()`` intra-op threads. The header names the CPU (``describe_cpu()``) and the integer path
``auto`` takes (timed on CPUs without int8 dot products; the decisions are listed).

    python benchmarks/cpu.py                                  # fixture and Vim-T, batch 1 and 64
    python benchmarks/cpu.py --shapes fixture --batches 64 --repeats 5
    python benchmarks/cpu.py --emulate-avx2                   # the same under an AVX2-only ISA (no VNNI / AMX)
    python benchmarks/cpu.py --shapes --packed-ops            # only torch's packed-weight ops beside ours

``--emulate-avx2`` re-runs the script with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``: PyTorch's own kernels, oneDNN (``torch._int_mm``) and MKL (the fp32 GEMM) then run
their AVX2 code (``ONEDNN_VERBOSE=1`` / ``MKL_VERBOSE=1`` confirm it), on this CPU's microarchitecture.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "checkpoints" / "vim-fashion-mnist"
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

if __name__ == "__main__" and "--emulate-avx2" in sys.argv and os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
    # the ISA caps are read when torch / oneDNN / MKL load: start again with them set
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})

import torch  # noqa: E402


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


def _int_activations(model) -> bool:
    from optimum_vim.modules import QLinear

    return any(isinstance(m, QLinear) and m.input_quantizer is not None for m in model.modules())


def variants(label: str, model) -> dict:
    """{variant name: context-manager factory} of one model: the reference, ``auto`` and each forced CPU path."""
    from optimum_vim_kernels import cpu

    from optimum_vim.ops.dispatch import use_kernels

    def forced(**kw):
        @contextlib.contextmanager
        def ctx():
            with use_kernels("cpu"), cpu.use_gemm_path(kw.get("path")), cpu.use_decode_cache(kw.get("cache", False)):
                yield
        return ctx

    if label == "float32":
        return {"float32": lambda: use_kernels("auto")}
    out = {"reference": lambda: use_kernels("reference"), "auto": lambda: use_kernels("auto")}
    if _int_activations(model):
        out.update({"int_mm": forced(path="int_mm"), "sgemm": forced(path="sgemm")})
    else:
        out.update({"decode per call": forced(cache=False), "decode cache": forced(cache=True)})
    return out


def _pixels(model, batch: int) -> torch.Tensor:
    c = model.config
    return torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))


def time_models(models: dict, batch: int, repeats: int, warmup: int = 2) -> dict:
    """Median forward seconds per (label, variant), rounds interleaved over every entry."""
    runs = [(label, name, ctx) for label, m in models.items() for name, ctx in variants(label, m).items()]
    x = _pixels(models["float32"], batch)
    times = collections.defaultdict(list)
    with torch.no_grad():
        for r in range(warmup + repeats):
            for label, name, ctx in runs:
                with ctx():
                    start = time.perf_counter()
                    models[label](pixel_values=x)
                    if r >= warmup:
                        times[(label, name)].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in times.items()}


def linear_times(models: dict, batch: int, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of one call of each block linear of layer 0 on (batch, L, K) inputs:
    ``{(leaf, label, variant): seconds}``; the float model's rows have label "float32"."""
    from optimum_vim.models.family import get_family

    BLOCK_LINEARS = get_family("vim").default_linear_roles

    fp = models["float32"]
    length = fp.config.sequence_length
    leaves = [n for n in ("in_proj", "x_proj", "dt_proj", "out_proj") if n in BLOCK_LINEARS]
    runs = []
    for leaf in leaves:
        x = torch.randn(batch, length, getattr(fp.vim.layers[0].mixer, leaf).in_features,
                        generator=torch.Generator().manual_seed(1))
        for label, model in models.items():
            layer = getattr(model.vim.layers[0].mixer, leaf)
            runs += [((leaf, label, name), layer, x, ctx) for name, ctx in variants(label, model).items()
                     if name != "reference"]
    times = collections.defaultdict(list)
    with torch.no_grad():
        for r in range(warmup + repeats):
            for key, layer, x, ctx in runs:
                with ctx():
                    start = time.perf_counter()
                    layer(x)
                    if r >= warmup:
                        times[key].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in times.items()}


class _Split:
    """Forward-hook timers: block linears (and, inside them, their input quantizers), scans, total."""

    def __init__(self, model):
        from optimum_vim.models.family import get_family
        from optimum_vim.models.vim.modeling_vim import VimSelectiveScan
        from optimum_vim.modules import QActivation, QLinear, QSelectiveScan

        BLOCK_LINEARS = get_family("vim").default_linear_roles

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


def _best_us(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def packed_ops_table(repeats: int) -> None:
    """torch's own packed-weight CPU ops beside the GEMMs the CPU kernels use, at Vim-T in_proj shapes: time (best of
    ``repeats``) and the largest difference from ``quant_gemm_ref`` relative to the largest output."""
    from optimum_vim_kernels import cpu, reference
    from optimum_vim_kernels.format import pack_signed

    print("\n### torch's packed-weight ops at Vim-T in_proj shapes (K 192, N 768; us, best of "
          f"{repeats}; max |diff| from the reference / max |y|)\n")
    print("| M | fp32 GEMM (float model) | W8A8 int_mm | W8A8 sgemm | W8 `_weight_int8pack_mm` | "
          "W4 g32 decode + GEMM (ours) | W4 g32 `_weight_int4pack_mm_for_cpu` | W4 g32 `_dyn_quant_matmul_4bit` |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    k, n, gs = 192, 768, 32
    c8 = torch.randint(-127, 128, (n, k), generator=g)
    c4 = torch.randint(-7, 8, (n, k), generator=g)
    s8, s4 = torch.rand(n, 1, generator=g) * 0.01, torch.rand(n, k // gs, generator=g) * 0.01
    q8, q4 = c8.to(torch.int8), pack_signed(c4, 4)
    u4 = (c4 + 8).to(torch.uint8)
    int4pack = torch._convert_weight_to_int4pack_for_cpu(u4.int(), 1)
    scale_zero = torch.stack([s4.t(), torch.zeros_like(s4.t())], -1).contiguous()
    dyn = torch.ops.aten._dyn_quant_pack_4bit_weight((u4[:, 1::2] << 4 | u4[:, ::2]).contiguous(), s4, torch.zeros(n),
                                                     gs, k, n)
    w = torch.randn(n, k, generator=g)
    for m in (197, 1576):
        x = torch.randn(m, k, generator=g)
        a8 = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        ref8 = reference.quant_gemm_ref(x, q8, s8, bits=8, in_features=k)
        ref4 = reference.quant_gemm_ref(x, q4, s4, bits=4, in_features=k, group_size=gs)

        def rel(y, ref):
            return f"{((y - ref).abs().max() / ref.abs().max()).item():.1e}"

        def timed(fn, *fargs, ref=None):
            us = _best_us(functools.partial(fn, *fargs), repeats)
            return f"{us:.0f}" if ref is None else f"{us:.0f} ({rel(fn(*fargs), ref)})"

        def int8_gemm(path, a):
            with cpu.use_gemm_path(path):
                return cpu.quant_gemm(a, q8, s8, bits=8, in_features=k, a_scale=torch.ones(1))

        cells = [timed(torch.mm, x, w.t()), timed(int8_gemm, "int_mm", a8), timed(int8_gemm, "sgemm", a8),
                 timed(torch._weight_int8pack_mm, x, q8, s8.reshape(-1), ref=ref8),
                 timed(functools.partial(cpu.quant_gemm, bits=4, in_features=k, group_size=gs), x, q4, s4),
                 timed(torch._weight_int4pack_mm_for_cpu, x, int4pack, gs, scale_zero, ref=ref4),
                 timed(torch.ops.aten._dyn_quant_matmul_4bit, x, dyn, gs, k, n, ref=ref4)]
        print(f"| {m} | " + " | ".join(cells) + " |")


def header() -> list[str]:
    from optimum_vim_kernels import cpu
    from optimum_vim_kernels.cpu_features import describe_cpu

    caps = {k: os.environ[k] for k in AVX2_ENV if k in os.environ}
    lines = [describe_cpu(), f"torch {torch.__version__}, {torch.get_num_threads()} threads"]
    if caps:
        lines.append("ISA emulation: " + " ".join(f"{k}={v}" for k, v in caps.items()))
    lines.append("integer GEMM path under auto: " + ("int_mm (int8 dot products: VNNI / AMX)" if cpu.int8_dot_product()
                                                     else "timed per (N, K, M bucket): no int8 dot product"))
    return lines


def print_choices() -> None:
    from optimum_vim_kernels import cpu

    choices = cpu.gemm_path_choices()
    if not choices:
        return
    print("\nauto's timed integer GEMM choices (first call of each shape bucket):\n")
    print("| N | K | M bucket | threads | int_mm (us) | sgemm (us) | chosen |")
    print("|---|---|---|---|---|---|---|")
    for (n, k, m, threads), (path, t) in sorted(choices.items()):
        print(f"| {n} | {k} | {m} | {threads} | {t['int_mm'] * 1e6:.0f} | {t['sgemm'] * 1e6:.0f} | {path} |")


def print_end_to_end(models, t, shape, batch, repeats) -> None:
    fp = t[("float32", "float32")]
    print(f"\n### {shape}, batch {batch}: end-to-end forward (median of {repeats})\n")
    print("| format | path | forward (ms) | speed-up vs float | vs reference |")
    print("|---|---|---|---|---|")
    print(f"| float32 | - | {fp * 1e3:.1f} | 1.00x | - |")
    for label, model in models.items():
        if label == "float32":
            continue
        ref = t[(label, "reference")]
        for name in variants(label, model):
            ms = t[(label, name)]
            print(f"| {label} | {name} | {ms * 1e3:.1f} | {fp / ms:.2f}x | {ref / ms:.2f}x |")


def print_linears(models, lt, shape, batch, repeats) -> None:
    m = models["float32"].config.sequence_length * batch
    print(f"\n### {shape}, batch {batch}: one block linear of layer 0 (M = {m} rows; us, median of {repeats})\n")
    leaves = sorted({k[0] for k in lt}, key=["in_proj", "x_proj", "dt_proj", "out_proj"].index)
    shapes = {leaf: getattr(models["float32"].vim.layers[0].mixer, leaf) for leaf in leaves}
    print("| format | path | " + " | ".join(f"{leaf} K={s.in_features} N={s.out_features}" for leaf, s in shapes.items())
          + " | sum | vs float |")
    print("|---|---|" + "---|" * (len(leaves) + 2))
    fp_sum = sum(lt[(leaf, "float32", "float32")] for leaf in leaves)
    for label, model in models.items():
        for name in variants(label, model):
            if name == "reference":
                continue
            vals = [lt[(leaf, label, name)] for leaf in leaves]
            print(f"| {label} | {name if label != 'float32' else '-'} | " + " | ".join(f"{v * 1e6:.0f}" for v in vals)
                  + f" | {sum(vals) * 1e6:.0f} | {fp_sum / sum(vals):.2f}x |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="*", default=["fixture", "vim-t"], choices=["fixture", "vim-t"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--vim-t-batch", type=int, default=None, help="batch used for Vim-T instead of 64 (slow on CPU)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration images of the fixture's RTN rows")
    p.add_argument("--no-split", action="store_true", help="skip the per-op split of the whole forward")
    p.add_argument("--emulate-avx2", action="store_true", help="run with the ISA capped at AVX2 (module docstring)")
    p.add_argument("--packed-ops", action="store_true", help="also time torch's packed-weight ops at Vim-T shapes")
    args = p.parse_args(argv)
    print("\n".join(header()))
    if args.packed_ops:
        packed_ops_table(max(args.repeats, 5))
    for shape in args.shapes:
        models = fixture_models(args.num_samples) if shape == "fixture" else vim_t_models()
        batches = args.batches if shape == "fixture" or args.vim_t_batch is None else \
            [b if b == 1 else args.vim_t_batch for b in args.batches]
        for batch in batches:
            repeats = args.repeats if batch > 1 or shape == "fixture" else max(args.repeats, 10)
            t = time_models(models, batch, repeats)
            print_end_to_end(models, t, shape, batch, repeats)
            if batch == max(batches):
                print_linears(models, linear_times(models, batch, max(args.repeats, 10)), shape, batch,
                              max(args.repeats, 10))
                if not args.no_split:
                    print(f"\n### {shape}, batch {batch}: per-op split of one forward (ms, auto)\n")
                    splits = {label: op_split(m, batch, max(1, args.repeats // 2)) for label, m in models.items()}
                    keys = ["block linears (quantizers + GEMM)", "  of which input quantizers", "selective scans",
                            "rest (conv, norms, gates, embed, head)", "total"]
                    print("| part | " + " | ".join(splits) + " |")
                    print("|---|" + "---|" * len(splits))
                    for key in keys:
                        print(f"| {key.strip()} | " + " | ".join(f"{s.get(key, 0) * 1e3:.1f}" for s in splits.values())
                              + " |")
            sys.stdout.flush()
    print_choices()
    return 0


if __name__ == "__main__":
    sys.exit(main())
