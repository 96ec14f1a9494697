"""An emulated accelerator for CPU-only tests of device placement.

CI has no GPU, yet the calibration code must keep every tensor on the model's device: a tensor created without
``device=`` (a generator draw, ``torch.zeros``, a ``.cpu()`` round trip) lands on the CPU and, on a real GPU, either
fails (``Expected all tensors to be on the same device``) or silently moves work to the host. :func:`emulated_device`
gives tests a second device without a GPU:

* tensors "on the device" are :class:`DeviceTensor` wrappers that hold ordinary CPU data, so every op computes
  exactly what it computes on the CPU (results can be compared bit for bit with a CPU run);
* ``model.to(device)``, ``x.to(device)``, factories with ``device=`` (also under ``with torch.device(device)``),
  ``torch.tensor(..., device=...)`` and ``.tolist()`` / ``.item()`` / ``.cpu()`` behave as they do on CUDA;
* an op that mixes a device tensor with a CPU tensor of one or more dimensions raises :class:`DeviceMismatch`, as
  CUDA does (0-dim CPU tensors are allowed, as CUDA allows them; so are CPU index tensors in indexing, which CUDA
  moves itself; ``copy_`` / ``to`` cross devices by design).

The device reports itself as ``meta``: the one non-CPU device type that every PyTorch build can name and guard
(``cuda`` cannot be named by a CPU-only build's indexing and ``.to`` paths). Code under test therefore takes its
non-CUDA, non-CPU branches: the quantized ops run their PyTorch references, which is what these tests check; the
kernels themselves are tested against those references elsewhere (interpreter here, compiled by
``benchmarks/gpu_check.sh`` on a GPU).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")
_CPU = torch.device("cpu")
# ops that CUDA lets a CPU tensor meet a device tensor in: copies, and indexing with CPU index tensors
_MIXING_ALLOWED = {"aten::copy_", "aten::_to_copy", "aten::index", "aten::index_put_", "aten::index_put",
                   "aten::_index_put_impl_", "aten::_local_scalar_dense"}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}


class DeviceMismatch(RuntimeError):
    """An op mixed a tensor on the emulated device with a CPU tensor (a real GPU would refuse it)."""


class DeviceTensor(torch.Tensor):
    """A tensor on the emulated device; ``elem`` holds its data (a CPU tensor)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self, **kwargs):
        return f"DeviceTensor({self.elem!r})"

    def __tensor_flatten__(self):
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return DeviceTensor(inner["elem"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_device(d) -> bool:
    return d is not None and torch.device(d).type == DEVICE.type


def _run(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    on_device = any(isinstance(t, DeviceTensor) for t in tensors)
    if any(not isinstance(t, DeviceTensor) and t.device.type == DEVICE.type for t in tensors):
        raise DeviceMismatch(f"{func}: a real {DEVICE.type} tensor (no data) was made outside the emulation")
    if on_device and func._schema.name not in _MIXING_ALLOWED:
        host = [tuple(t.shape) for t in tensors if not isinstance(t, DeviceTensor) and t.dim() > 0]
        if host:
            raise DeviceMismatch(f"{func}: a CPU tensor of shape {host[0]} meets a tensor on the model's device")
    target = kwargs.get("device")
    kw = {**kwargs, "device": _CPU} if _on_device(target) else kwargs
    unwrap = lambda t: t.elem if isinstance(t, DeviceTensor) else t  # noqa: E731
    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kw))
    if not (_on_device(target) if target is not None else on_device):
        return out  # a CPU result: created on or copied to the CPU
    out = tree_map(lambda t: DeviceTensor(t) if isinstance(t, torch.Tensor) else t, out)
    return return_and_correct_aliasing(func, args, kwargs, out)


class _DispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _FunctionMode(TorchFunctionMode):
    """The calls that never reach the dispatcher with their device: ``torch.tensor(data, device=...)`` builds its
    tensor below it, and ``.tolist()`` refuses tensor subclasses."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.tolist and isinstance(args[0], DeviceTensor):
            return args[0].elem.tolist()  # a device-to-host copy, as on CUDA
        if func in _FROM_DATA and _on_device(kwargs.get("device")):
            target = kwargs.pop("device")
            if isinstance(args[0], torch.Tensor):
                return args[0].to(device=target, dtype=kwargs.get("dtype"))
            return func(*args, **kwargs).to(target)
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_device():
    """``with emulated_device() as device:`` -- ``device`` is the emulated accelerator (see the module doc)."""
    with _FunctionMode(), _DispatchMode():
        yield DEVICE
