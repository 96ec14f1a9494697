"""The ``optimum-vim`` command line: convert, evaluate, quantize, push, export."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger("optimum_vim.cli")

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device(name: str | None):
    """``--device`` -> ``torch.device`` (None: the CPU). Raises ValueError, saying what to do, for an unknown device,
    or one that this machine's PyTorch cannot use (CUDA requested without a CUDA build, a driver or that GPU)."""
    import torch

    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch was built without CUDA" if torch.version.cuda is None
                   else "PyTorch finds no NVIDIA GPU or driver")
            raise ValueError(f"--device {name}: CUDA is not available ({why}; torch {torch.__version__}). Run on a "
                             "machine with an NVIDIA GPU and a CUDA build of PyTorch, or use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    backend = getattr(torch, device.type, None)
    if device.type in ("mps", "xpu") and backend is not None and backend.is_available():
        return device
    raise ValueError(f"--device {name}: {device.type!r} is not a device optimum-vim can run on here; use cpu, cuda "
                     "or cuda:N")


def resolve_dtype(name: str | None):
    """``--dtype`` -> ``torch.dtype`` (None: the checkpoint's own). Raises ValueError for any other dtype."""
    import torch

    if name is None:
        return None
    if name.lower() not in DTYPES:
        raise ValueError(f"unknown --dtype {name!r}: use float32, float16 or bfloat16")
    return getattr(torch, DTYPES[name.lower()])


def _add_device_args(p, what: str) -> None:
    p.add_argument("--device", default=None,
                   help=f"where {what} runs: cpu (default), cuda or cuda:N; under `accelerate launch` each process "
                        "uses its own device")
    p.add_argument("--dtype", default=None,
                   help="float32 | float16 | bfloat16: dtype of the float parts (default: as stored; quantized layers "
                        "keep their integer codes and fp32 scales)")


def _load_model(path: str, device, dtype, **kwargs):
    """``from_pretrained`` in ``dtype`` (None: as stored), then moved to ``device``."""
    from transformers import AutoModelForImageClassification

    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForImageClassification.from_pretrained(path, **kwargs).to(device)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an official hustvl/Vim .pth checkpoint to a transformers folder")
    p.add_argument("checkpoint", help="path to the official .pth file")
    p.add_argument("output_dir", help="new folder for config.json, model.safetensors, preprocessor_config.json")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--stride", type=int, default=None, help="expected patch stride (checked against the checkpoint)")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights (model_ema) instead of model")
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from .models.vim.convert_vim_checkpoint import convert_vim_checkpoint

    out = convert_vim_checkpoint(args.checkpoint, args.output_dir, image_size=args.image_size, use_ema=args.ema,
                                 stride=args.stride)
    print(f"wrote {out}")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1 accuracy of a (quantized) Vim on a labelled image data set")
    p.add_argument("model", help="model folder or Hub repo id")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist | mnist-subset | digits | a save_to_disk folder | an image folder")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--batch-size", type=int, default=256)
    _add_device_args(p, "the model")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from transformers import AutoImageProcessor

    from .evaluation import evaluate, load_named_dataset

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model = _load_model(args.model, device, dtype)
    processor = AutoImageProcessor.from_pretrained(args.model)
    dataset = load_named_dataset(args.dataset, args.split, args.limit)
    result = evaluate(model, dataset, processor, batch_size=args.batch_size)
    if _is_main_process():
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            print(f"top-1 {result.top1:.4f} ({result.correct}/{result.total}) in {result.seconds:.1f}s "
                  f"on {result.num_processes} process(es) ({result.device})")
    return 0


def _parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    """``key=value`` strings -> ``{key: value}`` (values stay strings; the option types parse them)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} must look like key=value; got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _parse_overrides(items: list[str] | None) -> dict:
    """``PATTERN=float`` or ``PATTERN=weight_bits:8,act_bits:8`` -> the config's overrides dict (values parsed by
    their declared types, :data:`optimum_vim.quantization_config.OVERRIDE_TYPES`)."""
    from .options import coerce_fields
    from .quantization_config import OVERRIDE_TYPES

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--override must look like PATTERN=float or PATTERN=weight_bits:8,...; got {item!r}")
        pattern, value = item.split("=", 1)
        if value == "float":
            out[pattern] = None
            continue
        settings = {}
        for part in value.split(","):
            key, sep, v = part.partition(":")
            key = key.strip()
            if not sep or key not in OVERRIDE_TYPES:
                raise ValueError(f"--override {item!r}: each setting is KEY:VALUE with KEY one of "
                                 f"{sorted(OVERRIDE_TYPES)}; got {part!r}")
            settings[key] = v
        out[pattern] = coerce_fields(OVERRIDE_TYPES, settings, f"--override {item!r}:", strings=True)
    return out


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a float Vim with a recipe and save the packed checkpoint")
    p.add_argument("model", help="float model folder or Hub repo id")
    p.add_argument("output_dir", help="new folder for the quantized checkpoint")
    p.add_argument("--recipe", default="rtn", help="rtn | ptq4vm (planned recipes are listed in the README)")
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--act-bits", type=int, default=None, help="omit for weight-only quantization")
    p.add_argument("--group-size", type=int, default=None, help="inputs per weight scale (default: per channel)")
    p.add_argument("--recipe-arg", action="append", metavar="KEY=VALUE", help="recipe option (repeatable)")
    p.add_argument("--calibration-dataset", default="fashion-mnist",
                   help="fashion-mnist | mnist-subset | digits | save_to_disk folder | image folder")
    p.add_argument("--calibration-split", default="train")
    p.add_argument("--num-samples", type=int, default=None, help="calibration images (default: the recipe's, "
                   "128 for rtn, 256 for ptq4vm)")
    p.add_argument("--calibration-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="head,patch_embed", help="comma-separated modules left in float")
    p.add_argument("--override", action="append", metavar="PATTERN=SETTINGS",
                   help="mixed precision: PATTERN=float or PATTERN=weight_bits:8,act_bits:8 (repeatable)")
    p.add_argument("--base-model", default=None,
                   help="Hub id of the float model, for the card's base_model (default: MODEL when it is a Hub id)")
    p.add_argument("--evaluate", action="store_true", help="measure float and quantized top-1 and print them")
    p.add_argument("--eval-dataset", default="fashion-mnist")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=500)
    _add_device_args(p, "calibration (and --evaluate)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_run_quantize)


def _run_quantize(args) -> int:
    import os
    from pathlib import Path

    from transformers import AutoImageProcessor

    from .evaluation import evaluate, load_named_dataset
    from .hub import atomic_save, set_card_info, write_loading_hints, write_model_card
    from .quantization_config import ViMQuantizationConfig
    from .quantizer import quantize_model
    from .recipes import get_recipe_class
    from .size import checkpoint_bytes, quantized_layer_bytes

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    recipe_args = get_recipe_class(args.recipe).parse_recipe_args(_parse_kv(args.recipe_arg, "--recipe-arg"))
    config = ViMQuantizationConfig(
        recipe=args.recipe, weight_bits=args.weight_bits, act_bits=args.act_bits, weight_group_size=args.group_size,
        recipe_args=recipe_args, num_calibration_samples=args.num_samples,
        calibration_batch_size=args.calibration_batch_size, seed=args.seed,
        modules_to_not_convert=[s for s in args.skip.split(",") if s], overrides=_parse_overrides(args.override),
        base_model=args.base_model,
    )
    processor = AutoImageProcessor.from_pretrained(args.model)
    if get_recipe_class(args.recipe).requires_data(config):
        config.calibration_dataset = load_named_dataset(args.calibration_dataset, args.calibration_split)
        config.image_processor = processor
    else:  # a data-free recipe (ouromamba) reads no images, but bounds its synthetic pixels with the processor
        config.image_processor = processor
    import time

    start = time.perf_counter()
    # the float model on its device and in its dtype, calibrated there (the calibration that from_pretrained runs
    # for a quantization_config)
    model = quantize_model(_load_model(args.model, device, dtype), config)
    seconds = time.perf_counter() - start
    sizes = quantized_layer_bytes(model)
    summary = {
        "model": args.model, "output": str(out), "recipe": args.recipe, "weight_bits": args.weight_bits,
        "act_bits": args.act_bits, "device": str(device), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantize_seconds": round(seconds, 2), "quantized_modules": sizes["layers"],
        "quantized_layer_bytes": sizes["quantized"], "fp16_layer_bytes": sizes["fp16"],
        "layer_size_ratio_vs_fp16": round(sizes["ratio"], 4),
    }
    if args.evaluate:
        data = load_named_dataset(args.eval_dataset, args.eval_split, args.eval_limit)
        fp_model = _load_model(args.model, device, dtype)
        fp = evaluate(fp_model, data, processor, batch_size=args.eval_batch_size)
        q = evaluate(model, data, processor, batch_size=args.eval_batch_size)
        summary.update(fp_top1=fp.top1, quantized_top1=q.top1, eval_images=q.total)
        command = f"optimum-vim evaluate <model> --dataset {args.eval_dataset} --split {args.eval_split}"
        if args.eval_limit:
            command += f" --limit {args.eval_limit}"
        set_card_info(model, accuracy={"dataset": f"{args.eval_dataset} {args.eval_split} ({q.total} images)",
                                       "top1": q.top1, "fp_top1": fp.top1, "command": command})

    fp_bytes = checkpoint_bytes(args.model) if os.path.isdir(args.model) else None
    sizes = {}

    def _save(tmp):  # one save: the card, written last, quotes the size of the weights just written
        model.save_pretrained(tmp, model_card=False)
        processor.save_pretrained(tmp)
        sizes["q"] = checkpoint_bytes(tmp)
        rows = [{"name": "quantized (this)", "bytes": f"{sizes['q']:,}"}]
        if fp_bytes:
            rows.insert(0, {"name": "float32 original", "bytes": f"{fp_bytes:,}"})
        set_card_info(model, sizes=rows)
        write_model_card(model, tmp, repo_id=out.name)
        write_loading_hints(tmp)

    atomic_save(_save, out)
    q_bytes = sizes["q"]
    summary.update(checkpoint_bytes=q_bytes, float_checkpoint_bytes=fp_bytes)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_quantize_summary(summary)
    return 0


def _print_quantize_summary(s: dict) -> None:
    act = f"A{s['act_bits']}" if s["act_bits"] else " weight-only"
    where = "" if s["device"] == "cpu" else f" on {s['device']}"
    print(f"quantized {s['model']} with {s['recipe']} W{s['weight_bits']}{act} in {s['quantize_seconds']:.1f}s{where} "
          f"({s['quantized_modules']} modules) -> {s['output']}")
    if s.get("float_checkpoint_bytes"):
        print(f"checkpoint: {s['float_checkpoint_bytes']:,} bytes float32 -> {s['checkpoint_bytes']:,} bytes "
              f"({s['checkpoint_bytes'] / s['float_checkpoint_bytes']:.2f}x)")
    print(f"quantized layers: {s['quantized_layer_bytes']:,} bytes vs {s['fp16_layer_bytes']:,} bytes fp16 "
          f"({s['layer_size_ratio_vs_fp16']:.3f}x)")
    if "fp_top1" in s:
        print(f"top-1 on {s['eval_images']} images: float {100 * s['fp_top1']:.2f}% -> quantized "
              f"{100 * s['quantized_top1']:.2f}% ({100 * (s['quantized_top1'] - s['fp_top1']):+.2f} points)")


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="publish a (quantized) Vim folder to the Hub with its model card")
    p.add_argument("model", help="model folder")
    p.add_argument("repo_id", help="target repo, e.g. my-org/vim-fmnist-w4a8")
    p.add_argument("--base-model", default=None, help="Hub id of the float model (card metadata base_model)")
    p.add_argument("--benchmark-table", default=None, help="JSON from benchmarks/accuracy.py --json: adds a plot")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--commit-message", default=None)
    p.set_defaults(func=_run_push)


def _run_push(args) -> int:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .hub import load_benchmark_table, push_model_to_hub, set_card_info

    model = AutoModelForImageClassification.from_pretrained(args.model)
    try:
        processor = AutoImageProcessor.from_pretrained(args.model)
    except OSError:
        processor = None
    table = load_benchmark_table(args.benchmark_table) if args.benchmark_table else None
    set_card_info(model, base_model=args.base_model, benchmark_table=table)
    url = push_model_to_hub(model, args.repo_id, processor=processor, private=args.private or None,
                            token=args.token, commit_message=args.commit_message)
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    return 0


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def build_parser(prog: str = "optimum-vim") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Vision Mamba for transformers: convert, "
                                     "quantize, evaluate and publish.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_evaluate(sub)
    _add_convert(sub)
    _add_push(sub)
    _add_export(sub)
    return parser


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a (quantized) Vim to ONNX or a torch.export program")
    p.add_argument("model", help="model folder or Hub repo id (float or quantized)")
    p.add_argument("output", help="file to write: model.onnx (--format onnx) or program.pt2 (--format torch)")
    p.add_argument("--format", choices=("onnx", "torch"), default="onnx", help="onnx (default) or torch (torch.export)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to the example's (default: dynamic)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch comparison")
    p.add_argument("--atol", type=float, default=None, help="allowed max abs difference in the check (default 1e-4)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import time
    from pathlib import Path

    from transformers import AutoModel, AutoModelForImageClassification

    from .export import DEFAULT_ATOL, DEFAULT_OPSET, export_onnx, export_program

    out = Path(args.output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new file name")
    try:
        model = AutoModelForImageClassification.from_pretrained(args.model)
    except ValueError:  # a backbone checkpoint without a classifier head
        model = AutoModel.from_pretrained(args.model)
    start = time.perf_counter()
    if args.format == "onnx":
        export_onnx(model, out, dynamic_batch=not args.static_batch, opset=args.opset or DEFAULT_OPSET,
                    check=not args.no_check, atol=args.atol if args.atol is not None else DEFAULT_ATOL)
    else:
        import torch

        out.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(export_program(model, dynamic_batch=not args.static_batch), str(out))
    checked = "" if args.format != "onnx" or args.no_check else ", checked against PyTorch with onnxruntime"
    print(f"exported {args.model} to {out} ({args.format}, {'static' if args.static_batch else 'dynamic'} batch"
          f"{checked}) in {time.perf_counter() - start:.1f}s")
    return 0


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of the Hub client that mean "could not talk to the Hub" (no network, refused, HTTP error)."""
    import importlib

    errors: list[type[BaseException]] = []
    names = {"httpx"}
    try:  # the HTTP library huggingface_hub's session really uses (httpx, or a fork of it)
        from huggingface_hub.utils import get_session

        names.add(type(get_session()).__module__.split(".")[0])
    except ImportError:  # pragma: no cover
        pass
    for name in sorted(names):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    try:
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        errors += [HfHubHTTPError, OfflineModeIsEnabled]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv: list[str] | None = None, prog: str = "optimum-vim") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import optimum_vim  # noqa: F401 - registration before any from_pretrained

    try:
        return args.func(args)
    except _network_errors() as err:
        from huggingface_hub import constants

        print(f"{prog} {args.command}: error: could not reach the Hub at {constants.ENDPOINT} ({type(err).__name__}: "
              f"{err}). Check the network connection, HF_ENDPOINT and the token (--token or `hf auth login`).",
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # bad input, missing or unreadable files and folders, unknown repo ids
        print(f"{prog} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
