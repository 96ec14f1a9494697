"""Export of float and quantized Vims: ``torch.export`` programs with a dynamic batch, and ONNX.

While ``torch.compiler.is_exporting()``, optimum-vim's ops take their export forms: the selective scan is one loop
node (``torch._higher_order_ops.scan``, an ONNX ``Scan``; not L unrolled steps), and quantized GEMMs run their
PyTorch references (no machine-specific kernel, no weight cache). A quantized model keeps its packed integer codes in
the exported graph (ONNX unpacks them with ``BitShift`` / ``BitwiseAnd``), so the file stays small and the values are
the same function as in PyTorch.

Not exportable, with the reason raised as :class:`ExportError` before any tracing:

* OuroMamba's ``dynamic_outlier`` activation quantizers with run-time detection (the default; the
  ``dynamic_outliers=False`` ablation's fixed outlier list exports): the outlier channels are chosen per input at run time (a
  data-dependent number of columns, ``nonzero``), which neither ``torch.export`` with a dynamic batch nor ONNX
  ``Scan`` bodies can express as a static graph;
* a model whose quantized modules still hold meta tensors (loaded with disk offload): export a model loaded whole.

ExecuTorch takes ``torch.export`` programs, but its runtime has no ``scan`` operator; lowering is not provided here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# onnxruntime vs PyTorch on the same input: the scan accumulates in a different order; measured max abs difference on
# the fixture's logits ~1e-6 (float and W4A8); this bound is what export_onnx(check=True) enforces
DEFAULT_ATOL = 1e-4


class ExportError(ValueError):
    """The model (or a part of it) cannot be exported; the message says which part and why."""


class _Outputs(nn.Module):
    """``pixel_values -> logits`` (classifier) or ``-> (last_hidden_state, pooler_output)`` (backbone): plain tensors
    in and out, the signature of the exported graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values=pixel_values, return_dict=True)
        if hasattr(out, "logits"):
            return out.logits
        return out.last_hidden_state, out.pooler_output


def check_exportable(model: nn.Module) -> None:
    """Raises :class:`ExportError` when ``model`` holds something that cannot be exported (see the module doc)."""
    from ..modules import QActivation

    for name, module in model.named_modules():
        if isinstance(module, QActivation) and module.granularity == "dynamic_outlier" \
                and not module.spec.static_outliers:
            raise ExportError(
                f"{name} is an OuroMamba dynamic_outlier quantizer: its outlier channels are chosen per input at run "
                "time (a data-dependent number of columns), which an exported static graph cannot express. Export a "
                "model with a fixed outlier list (recipe 'ouromamba' with recipe_args dynamic_outliers=False), one "
                "quantized by another recipe, or the float model."
            )
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ExportError(f"{len(meta)} tensors are on the meta device (e.g. {meta[:2]}): the model was loaded with "
                          "disk offload; load it whole (no device_map) to export it")


def _example(model: nn.Module, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    return x.to(device=param.device, dtype=param.dtype)


def _dynamic_shapes(dynamic_batch: bool):
    if not dynamic_batch:
        return None
    return {"pixel_values": {0: torch.export.Dim("batch", min=1, max=4096)}}


def export_program(model: nn.Module, example: torch.Tensor | None = None, dynamic_batch: bool = True):
    """``torch.export.export`` of ``model`` (a Vim, float or quantized) as ``pixel_values -> logits`` (or the
    backbone's ``(last_hidden_state, pooler_output)``), with the batch dimension dynamic unless ``dynamic_batch=False``.
    The scan is one ``scan`` node per direction and layer. Returns the ``ExportedProgram``."""
    check_exportable(model)
    model.eval()
    example = _example(model) if example is None else example
    with torch.no_grad():
        return torch.export.export(_Outputs(model), (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch),
                                   strict=False)


def _onnx_rshift(self, other):
    """``aten.__rshift__.Tensor`` for the exporter (it has none): ONNX ``BitShift`` works on unsigned ints only, and
    the shifted values (unpacked weight bytes) are non-negative, so the cast round trip is exact."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    shifted = op.BitShift(op.Cast(self, to=ir.DataType.UINT32), op.Cast(other, to=ir.DataType.UINT32),
                          direction="RIGHT")
    return op.CastLike(shifted, self)


def export_onnx(model: nn.Module, path: str | Path, *, dynamic_batch: bool = True, opset: int = DEFAULT_OPSET,
                check: bool = True, atol: float = DEFAULT_ATOL, example: torch.Tensor | None = None) -> Path:
    """Writes ``model`` as ONNX to ``path`` (input ``pixel_values``, output ``logits`` or ``last_hidden_state`` and
    ``pooler_output``; batch dynamic unless ``dynamic_batch=False``). With ``check`` (default) the file is run in
    onnxruntime on a batch of another size and compared with PyTorch: a difference above ``atol`` raises.

    Needs ``pip install 'optimum-vim[export]'`` (onnx, onnxscript, onnxruntime)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'optimum-vim[export]'") from err
    from ..modules import QModule

    check_exportable(model)
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(model) if example is None else example
    wrapper = _Outputs(model)
    with torch.no_grad():
        reference = wrapper(example)
    names = ["logits"] if isinstance(reference, torch.Tensor) else ["last_hidden_state", "pooler_output"]
    # the exporter's optimizer folds constant subgraphs, which would store a quantized model's unpacked weights (as
    # fp64: the references accumulate integer products exactly in fp64) instead of its packed codes
    quantized = any(isinstance(m, QModule) for m in model.modules())
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, opset_version=opset, input_names=["pixel_values"], output_names=names,
            dynamic_shapes=_dynamic_shapes(dynamic_batch), verbose=False, optimize=not quantized,
            custom_translation_table={torch.ops.aten.__rshift__.Tensor: _onnx_rshift},
        )
    program.save(str(path))
    _strip_node_metadata(path)
    if check:
        check_onnx(model, path, atol=atol, batch=3 if dynamic_batch else example.shape[0])
    return path


def _strip_node_metadata(path: Path) -> None:
    """Drops the exporter's per-node debugging metadata (stack traces, module paths), which the optimizer pass would
    drops for float models and is skipped for quantized ones: without it a quantized file is 40x larger than its
    tensors."""
    import onnx

    model = onnx.load(str(path))

    def strip(graph):
        for node in graph.node:
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    strip(attr.g)

    strip(model.graph)
    onnx.save(model, str(path))


def check_onnx(model: nn.Module, path: str | Path, *, atol: float = DEFAULT_ATOL, batch: int = 3) -> float:
    """Runs the ONNX file in onnxruntime and PyTorch on the same random batch; returns the max abs difference and
    raises :class:`ExportError` above ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError("checking an ONNX export needs onnxruntime: pip install 'optimum-vim[export]'") from err
    x = _example(model, batch).float()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = _Outputs(model)(x.to(next(model.parameters()).dtype))
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    diff = max(float((torch.from_numpy(o) - e.float().cpu()).abs().max()) for o, e in zip(outputs, expected))
    if not diff <= atol:
        raise ExportError(f"onnxruntime's output differs from PyTorch's by {diff:.3g} (> atol {atol}) on {path}")
    logger.info("onnxruntime matches PyTorch within %.3g on %s", diff, path)
    return diff


__all__ = ["DEFAULT_ATOL", "ExportError", "check_exportable", "check_onnx", "export_onnx", "export_program"]
