"""Kernel selection for the quantized ops: Triton on CUDA, the CPU kernel family on CPU, the PyTorch reference
when neither can serve the call.

``OPTIMUM_VIM_KERNELS`` (read at call time) or :func:`use_kernels` picks the policy:

* ``auto`` (default): Triton on CUDA tensors, the CPU kernels (``optimum_vim_kernels.cpu``: integer GEMMs on
  ``torch._int_mm`` or the exact sgemm path chosen per CPU, weights decoded from the packed codes, the fused numba
  scan and conv) on CPU tensors, each when it supports the call; else the reference;
* ``reference``: always the PyTorch reference;
* ``triton``: always Triton (CPU tensors too, which needs ``TRITON_INTERPRET=1``); an unsupported call raises
  :class:`KernelUnsupportedError` with the reason instead of falling back;
* ``cpu``: the CPU kernels, never Triton (CPU tensors only): a call that a CPU kernel cannot serve raises like
  ``triton``; an op outside the CPU family runs its PyTorch path.

The float selective scan of the unquantized model is chosen by :func:`float_scan_backend` (on CUDA: mamba-ssm when
importable, else the Triton scan, else the PyTorch loop with one WARNING that says what to install).

Each kernel module of ``optimum_vim_kernels`` exposes ``supports_<op>(...) -> str | None`` (None: supported,
else the reason) next to the launcher, so dispatch never hard-codes which kernel handles what. The Triton family is
one module per op family (``gemm``, ``scan``, ``outlier``); the CPU family is the single module ``cpu``, and an op it
lacks (no ``supports_<op>``) runs the reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "OPTIMUM_VIM_KERNELS"


class KernelBackend(str, enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"
    TRITON = "triton"
    CPU = "cpu"


class KernelUnsupportedError(RuntimeError):
    """A kernel family was forced (``triton`` / ``cpu``) but cannot serve this call (the message says why)."""


_override: contextvars.ContextVar[KernelBackend | None] = contextvars.ContextVar("optimum_vim_kernels", default=None)


def current_backend() -> KernelBackend:
    """The active policy: a :func:`use_kernels` context, else ``$OPTIMUM_VIM_KERNELS``, else ``auto``."""
    forced = _override.get()
    if forced is not None:
        return forced
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    try:
        return KernelBackend(value)
    except ValueError:
        raise ValueError(f"{ENV_VAR}={value!r}; use one of {[b.value for b in KernelBackend]}") from None


@contextlib.contextmanager
def use_kernels(backend: str | KernelBackend):
    """Context manager forcing a kernel policy for the ops called inside it."""
    token = _override.set(KernelBackend(backend))
    try:
        yield
    finally:
        _override.reset(token)


_modules: dict[str, object] = {}


def _load(module: str):
    """The kernel module (imported once), or the ImportError that importing it raised."""
    mod = _modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(f"optimum_vim_kernels.{module}")
        except ImportError as err:
            return err
        _modules[module] = mod
    return mod


def pick_kernel(family: str, op: str, tensor: torch.Tensor, **support_args):
    """Returns the launcher that serves ``op`` under the active policy: ``optimum_vim_kernels.<family>.<op>``
    (Triton) or ``optimum_vim_kernels.cpu.<op>`` (CPU) when its ``supports_<op>(**support_args)`` allows it, else
    None (the caller runs the reference)."""
    if torch.compiler.is_compiling():
        return _pick_traced(op, tensor, support_args)
    backend = current_backend()
    if backend is KernelBackend.REFERENCE:
        return None
    if backend is KernelBackend.CPU or (backend is KernelBackend.AUTO and not tensor.is_cuda):
        return _pick_cpu(op, tensor, support_args, forced=backend is KernelBackend.CPU)
    mod = _load(family)
    if isinstance(mod, ImportError):
        reason = f"Triton kernels unavailable ({mod}); install triton"
    else:
        reason = getattr(mod, f"supports_{op}")(**support_args)
        if reason is None and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            reason = "CPU tensors need TRITON_INTERPRET=1 (set before importing Triton)"
    if reason is None:
        return getattr(mod, op)
    if backend is KernelBackend.TRITON:
        raise KernelUnsupportedError(f"{family}.{op}: {reason}")
    logger.debug("%s.%s falls back to the PyTorch reference: %s", family, op, reason)
    return None


def _pick_traced(op: str, tensor: torch.Tensor, support_args: dict):
    """The choice under ``torch.compile`` (dynamo cannot read the :func:`use_kernels` context variable, nor import):
    the CPU family for CPU tensors when ``$OPTIMUM_VIM_KERNELS`` is ``auto`` or ``cpu`` and an eager call has loaded
    it (their weight decodings are traced into the graph instead of cached; both give the reference's values bit for
    bit), the PyTorch reference otherwise, which the compiler fuses itself.
    Under ``torch.export`` always the reference: an exported program must not depend on the exporting machine."""
    if torch.compiler.is_exporting() or tensor.device.type != "cpu":
        return None
    if os.environ.get(ENV_VAR, "auto").strip().lower() not in ("auto", "cpu"):
        return None
    cpu = _modules.get("cpu")  # dynamo cannot import: before any eager call has loaded the family, the reference
    if cpu is None or isinstance(cpu, ImportError) or op in getattr(cpu, "OPAQUE_TO_COMPILE", ()):
        return None  # the numba kernels cannot be traced: their PyTorch references are
    if not hasattr(cpu, f"supports_{op}") or getattr(cpu, f"supports_{op}")(**support_args) is not None:
        return None
    return getattr(cpu, op)


def _pick_cpu(op: str, tensor: torch.Tensor, support_args: dict, forced: bool):
    mod = _load("cpu")
    if isinstance(mod, ImportError):
        reason = f"CPU kernels unavailable ({mod})"
    elif tensor.device.type != "cpu":
        reason = f"the CPU kernels take CPU tensors; got {tensor.device}"
    elif not hasattr(mod, f"supports_{op}"):  # outside the family: the reference (or the op's own PyTorch path)
        logger.debug("cpu.%s: no CPU kernel for this op; the PyTorch path serves it", op)
        return None
    else:
        reason = getattr(mod, f"supports_{op}")(**support_args)
    if reason is None:
        return getattr(mod, op)
    if forced:
        raise KernelUnsupportedError(f"cpu.{op}: {reason}")
    logger.debug("cpu.%s falls back to the PyTorch reference: %s", op, reason)
    return None


# ---------------------------------------------------------------------------------------------------------------
# the float selective scan on an accelerator
@functools.lru_cache(maxsize=1)
def mamba_scan_available() -> bool:
    """True when mamba-ssm's CUDA selective scan imports (checked once per process: a failing import is slow)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure (missing package, ABI mismatch) means "not available"
        logger.debug("mamba-ssm selective scan unavailable: %s", err)
        return False
    return True


_warned_scan: set[str] = set()

_SCAN_INSTALL_HINT = ("install mamba-ssm (`pip install 'optimum-vim[cuda]'`) for its fused CUDA scan with backward; "
                      "triton serves the forward-only scan")


def float_scan_backend(u: torch.Tensor, *tensors: torch.Tensor | None, d_state: int) -> str:
    """``"mamba"``, ``"triton"`` or ``"torch"``: what runs a float selective scan on the CUDA tensor ``u`` under
    ``backend="auto"`` (``tensors``: the scan's other inputs, to see whether autograd needs its backward).

    * ``auto`` policy: mamba-ssm when importable; else, without autograd, our Triton scan
      (``optimum_vim_kernels.scan.selective_scan_q``, which serves float inputs too) when it supports the shape;
      else the per-token PyTorch loop, announced once per reason at WARNING with what to install;
    * ``triton``: the Triton scan when no gradient is needed (never mamba-ssm); an unsupported shape raises
      :class:`KernelUnsupportedError`; with autograd the loop (the Triton scan has no backward);
    * ``reference`` / ``cpu``: mamba-ssm when importable, else the loop (as chosen: no warning).

    float64 inputs always take the loop (neither kernel computes in float64).
    """
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):  # float64: the exact loop, on purpose
        return "torch"
    policy = current_backend()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, *tensors))
    if policy is not KernelBackend.TRITON and mamba_scan_available():
        return "mamba"
    if policy in (KernelBackend.REFERENCE, KernelBackend.CPU):
        return "torch"
    if needs_grad:
        reason = "training through the scan needs a backward, which the Triton scan does not have"
    else:
        mod = _load("scan")
        reason = (f"Triton is unavailable ({mod})" if isinstance(mod, ImportError)
                  else mod.supports_selective_scan_q(length=u.shape[1], d_state=d_state))
        if reason is None:
            return "triton"
        if policy is KernelBackend.TRITON:
            raise KernelUnsupportedError(f"scan.selective_scan_q (float scan): {reason}")
    if policy is not KernelBackend.TRITON and reason not in _warned_scan:
        _warned_scan.add(reason)
        logger.warning("selective scan on %s runs the per-token PyTorch loop, which is much slower: %s. To fix: %s.",
                       u.device, reason, _SCAN_INSTALL_HINT)
    return "torch"
