"""The ``optimum-vim`` command line: convert, evaluate, quantize, push."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger("optimum_vim.cli")


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
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .evaluation import evaluate, load_named_dataset

    model = AutoModelForImageClassification.from_pretrained(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    dataset = load_named_dataset(args.dataset, args.split, args.limit)
    result = evaluate(model, dataset, processor, batch_size=args.batch_size)
    if _is_main_process():
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            print(f"top-1 {result.top1:.4f} ({result.correct}/{result.total}) in {result.seconds:.1f}s "
                  f"on {result.num_processes} process(es)")
    return 0


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optimum-vim", description="Vision Mamba for transformers: convert, "
                                     "quantize, evaluate and publish.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_evaluate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import optimum_vim  # noqa: F401 - registration before any from_pretrained

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"optimum-vim {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
