"""End-to-end GPU check of every recipe: calibrate the bundled fixture on CUDA, check placement, accuracy against the
float model, the Triton kernels actually used, save + reload, fp16, and whether seeded reruns are bit-identical.

Per recipe (small calibration budgets: a device check, not the accuracy tables of benchmarks/accuracy.py):

* calibration on the GPU (``quantize_model`` on the model moved there): seconds, peak GPU memory, every parameter
  and buffer still on the GPU afterwards;
* logits of the quantized model on held-out images against the float model's: SQNR (dB), top-1 agreement, top-1
  accuracy when Fashion-MNIST is given (``--data``, a folder with ``fashion-mnist/t10k-*.gz``; else random
  images and no accuracy);
* the Triton launches of one quantized forward (GEMM, scan, combine, outlier GEMM), counted;
* ``save_pretrained`` + ``from_pretrained`` on the GPU: bit-identical logits; the model cast to fp16: SQNR to fp32;
* ``--rerun`` recipes calibrate twice: bit-identical state dicts or not (the determinism rule of
  ``optimum_vim.calibration.blockwise``); with ``--deterministic`` under ``torch.use_deterministic_algorithms(True)``
  and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (set before CUDA starts).

Also: the float model's scan choice and its logits against the PyTorch loop; RTN calibrated on the CPU against RTN
calibrated on the GPU; and, when ``datasets`` imports and Fashion-MNIST is given, the command line with
``--device cuda`` (quantize + evaluate). ``--dry-run`` checks the arguments, the fixture, the data folder and every
recipe configuration without a GPU. Output: ``--out`` (JSON) and a Markdown table on stdout.

``--ptq4vm-vim-s`` times, instead of all the above, PTQ4VM W4A4 at the paper's settings (256 images, 100 JLSS steps
per block) on a Vim-S-shaped model (random weights, 224 x 224, 197 tokens) with ``--vim-s-blocks`` of its 24 blocks
(default 2): the engine calibrates one block after another on the same shapes, so 24 x the seconds per block (after
the embedding) estimates the whole model against the issue's 5-minute goal.

    python benchmarks/gpu_e2e.py --out e2e.json --data .gpu-data
    python benchmarks/gpu_e2e.py --ptq4vm-vim-s --out calib.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "checkpoints" / "vim-fashion-mnist"
# recipe -> (ViMQuantizationConfig settings, calibration images; 0: data-free)
RECIPES = {
    "rtn": (dict(recipe="rtn", weight_bits=4, act_bits=8,
                 recipe_args={"act_granularity": "token", "scan_act_bits": 8}), 128),
    "ptq4vm": (dict(recipe="ptq4vm", weight_bits=4, act_bits=4, recipe_args={"steps": 20}), 64),
    "kscale": (dict(recipe="kscale", weight_bits=8, act_bits=8), 64),
    "ouromamba": (dict(recipe="ouromamba", weight_bits=4, act_bits=4,
                       recipe_args={"num_synthetic": 16, "gen_iterations": 20, "epochs": 2}), 0),
    "vimvq": (dict(recipe="vimvq", weight_bits=2, act_bits=None, recipe_args={"iterations": 20}), 64),
}
# --quick: the same checks at toy budgets (a CPU run of the script's logic: --device cpu --quick)
QUICK = {"ptq4vm": {"steps": 2}, "kscale": {"search_candidates": 5, "search_rounds": 1},
         "ouromamba": {"num_synthetic": 2, "gen_iterations": 2, "epochs": 1}, "vimvq": {"iterations": 2,
                                                                                        "kmeans_iterations": 5}}
EVAL_IMAGES = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--rerun", nargs="*", default=["rtn", "ptq4vm", "vimvq"], choices=list(RECIPES),
                   help="recipes calibrated a second time to check bit-identical reruns")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8")
    p.add_argument("--data", default=None, help="folder holding fashion-mnist/t10k-images-idx3-ubyte.gz (+ labels)")
    p.add_argument("--out", default="e2e.json")
    p.add_argument("--no-cli", action="store_true", help="skip the command-line run")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: checks the script)")
    p.add_argument("--quick", action="store_true", help="toy calibration budgets and 100 eval images")
    p.add_argument("--ptq4vm-vim-s", action="store_true", help="only time PTQ4VM W4A4 on a Vim-S-shaped model")
    p.add_argument("--vim-s-blocks", type=int, default=2, help="blocks of that model to calibrate (24 estimated)")
    p.add_argument("--dry-run", action="store_true", help="check arguments, files and configurations; run nothing")
    args = p.parse_args(argv)
    unknown = sorted(set(args.rerun) - set(args.recipes))
    if unknown:
        p.error(f"--rerun names recipes that --recipes leaves out: {unknown}")
    return args


def fashion_dir(data: str | None) -> Path | None:
    """The Fashion-MNIST folder under ``data`` (None when not given); raises when given but incomplete."""
    if data is None:
        return None
    root = Path(data) / "fashion-mnist"
    missing = [f for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz") if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"--data {data}: {root} lacks {missing} (benchmarks/gpu_prep.sh copies them)")
    return root


def configs() -> dict:
    """Every recipe's ViMQuantizationConfig, built (and so validated) without data."""
    from optimum_vim import ViMQuantizationConfig

    return {name: ViMQuantizationConfig(**settings) for name, (settings, _) in RECIPES.items()}


def images(data_root: Path | None, processor):
    """(calibration pool (N, 1, 28, 28), eval images, eval labels or None): Fashion-MNIST test images through the
    fixture's processor (eval: the first 1000, calibration: from 5000 on), else seeded random images."""
    import torch

    if data_root is None:
        g = torch.Generator().manual_seed(0)
        return torch.randn(256, 1, 28, 28, generator=g), torch.randn(EVAL_IMAGES, 1, 28, 28, generator=g), None
    from PIL import Image

    from optimum_vim.data.loaders import load_fashion_mnist_arrays

    arrays, labels = load_fashion_mnist_arrays("test", data_root)
    pixels = lambda a: processor([Image.fromarray(x, mode="L") for x in a], return_tensors="pt").pixel_values  # noqa: E731
    return pixels(arrays[5000:5256]), pixels(arrays[:EVAL_IMAGES]), torch.as_tensor(labels[:EVAL_IMAGES])


def count_launches():
    """Context manager counting the Triton launcher calls (by launcher name) made in its body."""
    from gpu_kernels import record_launches  # benchmarks/ is the script's folder, first on sys.path

    return record_launches()


def logits(model, x, batch=250):
    import torch

    with torch.no_grad():
        return torch.cat([model(x[i:i + batch].to(next(model.parameters()).device)).logits.float().cpu()
                          for i in range(0, x.shape[0], batch)])


def compare(fp, q, labels) -> dict:
    from accuracy import logit_sqnr_db

    out = {"sqnr_db": logit_sqnr_db(fp, q), "agreement": (fp.argmax(-1) == q.argmax(-1)).float().mean().item()}
    if labels is not None:
        out.update(fp_top1=(fp.argmax(-1) == labels).float().mean().item(),
                   top1=(q.argmax(-1) == labels).float().mean().item())
    return out


def same_state(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def settings_of(name: str, quick: bool) -> tuple[dict, int]:
    settings, n = copy.deepcopy(RECIPES[name])
    if quick:
        settings["recipe_args"] = {**settings.get("recipe_args", {}), **QUICK.get(name, {})}
        n = min(n, 16)
    return settings, n


def run_recipe(name, fp, calib_pool, eval_x, fp_logits, labels, device, rerun: bool, quick: bool) -> dict:
    import torch
    from transformers import AutoModelForImageClassification

    from optimum_vim import ViMQuantizationConfig, quantize_model

    settings, n = settings_of(name, quick)

    def calibrate():
        cfg = ViMQuantizationConfig(**settings, calibration_dataset=calib_pool[:n] if n else None,
                                    num_calibration_samples=max(n, 1))
        return quantize_model(copy.deepcopy(fp), cfg)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    q = calibrate()
    if cuda:
        torch.cuda.synchronize(device)
    row = {"calibrate_s": time.perf_counter() - start,
           "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan")}
    row["off_device"] = [k for k, t in [*q.named_parameters(), *q.named_buffers()] if t.device.type != device.type][:5]
    with count_launches() as calls:
        q_logits = logits(q, eval_x[:250])
    row["triton_launches"] = {k: sum(1 for c in calls if c[0] == k) for k in
                              ("quant_gemm", "selective_scan_q", "combine_directions", "outlier_gemm")}
    q_logits = logits(q, eval_x)
    row.update(compare(fp_logits, q_logits, labels))
    with tempfile.TemporaryDirectory() as tmp:
        q.save_pretrained(tmp)
        again = AutoModelForImageClassification.from_pretrained(tmp).to(device)
        row["reload_bit_identical"] = bool(torch.equal(logits(again, eval_x), q_logits))
    half = logits(copy.deepcopy(q).to(torch.float16), eval_x)
    row["fp16"] = compare(q_logits, half, None)
    if rerun:
        row["rerun_bit_identical"] = same_state(q, calibrate())
    return row


def float_checks(fp, eval_x, device) -> dict:
    import torch

    from optimum_vim.ops.dispatch import float_scan_backend, use_kernels

    u = torch.zeros(1, fp.config.sequence_length, fp.config.intermediate_size, device=device)
    # what selective_scan's backend="auto" runs on this device (it asks float_scan_backend on CUDA only)
    out = {"scan_backend": float_scan_backend(u, d_state=fp.config.d_state) if device.type == "cuda" else "torch"}
    auto = logits(fp, eval_x)
    loop = copy.deepcopy(fp)
    for layer in loop.vim.layers:
        layer.mixer.ssm.backend = layer.mixer.ssm_b.backend = "torch"
    with use_kernels("reference"):
        ref = logits(loop, eval_x)
    out["max_abs_diff_vs_loop"] = (auto - ref).abs().max().item()
    return out, auto


def cli_checks(data_root: Path | None, device, quick: bool) -> dict:
    """The command line with --device cuda, when it can run here (datasets + Fashion-MNIST)."""
    try:
        import datasets  # noqa: F401
    except Exception as err:  # noqa: BLE001 - missing, or a carried wheel that does not fit the device's pyarrow
        return {"skipped": f"datasets does not import ({type(err).__name__}: {err}); carry its wheel: "
                           "benchmarks/gpu_prep.sh"}
    if data_root is None:
        return {"skipped": "no Fashion-MNIST (--data)"}
    env = {**os.environ, "OPTIMUM_VIM_FASHION_MNIST_DIR": str(data_root)}
    limit = 100 if quick else EVAL_IMAGES
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "w4a8")
        commands = {
            "quantize": [sys.executable, "-m", "optimum_vim", "quantize", str(FIXTURE), folder, "--weight-bits", "4",
                         "--act-bits", "8", "--device", str(device), "--calibration-split", "test", "--evaluate",
                         "--eval-limit", str(limit), "--num-samples", str(16 if quick else 128), "--json"],
            "evaluate_fp16": [sys.executable, "-m", "optimum_vim", "evaluate", folder, "--device", str(device),
                              "--dtype", "float16", "--limit", str(limit), "--json"],
        }
        for key, cmd in commands.items():
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            out[key] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else \
                {"returncode": res.returncode, "stderr": res.stderr[-1500:]}
    return out


def markdown(result: dict) -> str:
    lines = ["| recipe | calibrate (s) | peak GPU (MiB) | SQNR (dB) | agreement | top-1 | Triton launches (gemm / scan / "
             "combine / outlier) | reload identical | fp16 SQNR (dB) | rerun identical | off device |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["recipes"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:200]} |" + " |" * 9)
            continue
        launches = " / ".join(str(v) for v in r["triton_launches"].values())
        top1 = f"{100 * r['top1']:.2f}%" if "top1" in r else "-"
        lines.append(f"| {name} | {r['calibrate_s']:.1f} | {r['peak_gpu_mib']:.0f} | {r['sqnr_db']:.2f} | "
                     f"{100 * r['agreement']:.2f}% | {top1} | {launches} | {r['reload_bit_identical']} | "
                     f"{r['fp16']['sqnr_db']:.1f} | {r.get('rerun_bit_identical', '-')} | {r['off_device'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.deterministic:  # before torch starts CUDA: cuBLAS reads it when it makes its workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    data_root = fashion_dir(args.data)
    if not (FIXTURE / "model.safetensors").is_file():
        raise SystemExit(f"the fixture is missing at {FIXTURE}")
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import optimum_vim  # noqa: F401

    cfgs = configs()
    if args.dry_run and args.ptq4vm_vim_s:
        print(f"dry run: PTQ4VM W4A4 on Vim-S, {args.vim_s_blocks} of 24 blocks, 256 images, 100 steps -> {args.out}")
        return 0
    if args.dry_run:
        print(f"dry run: recipes {args.recipes} (configurations valid: {sorted(cfgs)}), reruns {args.rerun}, "
              f"data {data_root or 'random images'}, out {args.out}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_e2e.py needs a CUDA GPU (none found); --dry-run checks the setup without one")
        return 2
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    if args.ptq4vm_vim_s:
        result = ptq4vm_vim_s(device, args.vim_s_blocks, quick=args.quick)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0
    processor = AutoImageProcessor.from_pretrained(FIXTURE)
    calib_pool, eval_x, labels = images(data_root, processor)
    if args.quick:
        eval_x, labels = eval_x[:100], None if labels is None else labels[:100]
    fp = AutoModelForImageClassification.from_pretrained(FIXTURE).to(device).eval()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__,
              "deterministic": args.deterministic, "data": "fashion-mnist test" if data_root else "random",
              "recipes": {}}
    result["float"], fp_logits = float_checks(fp, eval_x, device)
    if labels is not None:
        result["float"]["top1"] = (fp_logits.argmax(-1) == labels).float().mean().item()
    for recipe in args.recipes:
        try:
            result["recipes"][recipe] = run_recipe(recipe, fp, calib_pool, eval_x, fp_logits, labels, device,
                                                   rerun=recipe in args.rerun, quick=args.quick)
        except Exception as err:  # noqa: BLE001 - one recipe's failure is a finding; the others still run
            result["recipes"][recipe] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{recipe}: {json.dumps(result['recipes'][recipe])[:400]}", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if "rtn" in args.recipes and not args.deterministic and "error" not in result["recipes"]["rtn"]:
        try:
            result["rtn_cpu_vs_gpu"] = rtn_cpu_vs_gpu(fp, calib_pool, eval_x, args.quick)
        except Exception as err:  # noqa: BLE001
            result["rtn_cpu_vs_gpu"] = {"error": f"{type(err).__name__}: {err}"}
    if not args.no_cli and not args.deterministic:
        result["cli"] = cli_checks(data_root, device, args.quick)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(result))
    for key in ("float", "rtn_cpu_vs_gpu", "cli"):
        if key in result:
            print(f"{key}: {json.dumps(result[key])[:1500]}")
    return 0


def ptq4vm_vim_s(device, blocks: int, quick: bool = False) -> dict:
    """PTQ4VM W4A4 (paper settings: 256 images, 100 steps per block) on a Vim-S-shaped model with ``blocks`` blocks:
    seconds, seconds per block, the 24-block estimate, peak memory, the scan backend that training used."""
    import torch

    from optimum_vim import VimConfig, VimForImageClassification, ViMQuantizationConfig, quantize_model
    from optimum_vim.ops.dispatch import float_scan_backend

    torch.manual_seed(0)
    images, steps = (8, 2) if quick else (256, 100)
    config = VimConfig(hidden_size=384, num_hidden_layers=blocks)  # Vim-S: 384 wide, d_state 16, 224 / 16
    model = VimForImageClassification(config).to(device).eval()
    calib = torch.randn(images, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    cfg = ViMQuantizationConfig(recipe="ptq4vm", weight_bits=4, act_bits=4, calibration_dataset=calib,
                                num_calibration_samples=images, recipe_args={"steps": steps})
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    quantize_model(model, cfg)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    u = torch.zeros(1, config.sequence_length, config.intermediate_size, device=device, requires_grad=True)
    return {"model": "Vim-S shape, random weights", "blocks": blocks, "images": images, "steps": steps,
            "seconds": seconds, "seconds_per_block": seconds / blocks, "estimate_24_blocks_s": 24 * seconds / blocks,
            "goal_s": 300, "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else float("nan"),
            "training_scan": float_scan_backend(u, d_state=config.d_state) if cuda else "torch"}


def rtn_cpu_vs_gpu(fp, calib_pool, eval_x, quick: bool) -> dict:
    """RTN calibrated on the CPU and on the GPU, same images: how far apart the scales and logits are (other
    summation orders make them differ in the last bits; bit-identical is not expected)."""
    import torch
    from accuracy import logit_sqnr_db

    from optimum_vim import ViMQuantizationConfig, quantize_model

    settings, n = settings_of("rtn", quick)

    def calibrate(model):
        cfg = ViMQuantizationConfig(**settings, calibration_dataset=calib_pool[:n], num_calibration_samples=n)
        return quantize_model(copy.deepcopy(model), cfg)

    on_gpu = calibrate(fp)
    on_cpu = calibrate(copy.deepcopy(fp).cpu())
    gpu_state = on_gpu.state_dict()
    scales = {k: t for k, t in on_cpu.state_dict().items() if k.endswith("scale")}
    rel = max(((t - gpu_state[k].cpu()).abs() / t.abs().clamp(min=1e-12)).max().item() for k, t in scales.items())
    with torch.no_grad():
        cpu_logits = logits(on_cpu, eval_x)
    return {"scales_compared": len(scales), "max_rel_scale_diff": rel, "bit_identical": rel == 0,
            "logit_sqnr_db_cpu_vs_gpu": logit_sqnr_db(cpu_logits, logits(on_gpu, eval_x))}


if __name__ == "__main__":
    sys.exit(main())
