"""Kernel selection for the quantized ops: Triton when it can serve the call, the PyTorch reference otherwise.

``OPTIMUM_VIM_KERNELS`` (read at call time) or :func:`use_kernels` picks the policy:

* ``auto`` (default): Triton on CUDA tensors when the kernel supports the shapes, else the reference;
* ``reference``: always the PyTorch reference;
* ``triton``: always Triton (CPU tensors too, which needs ``TRITON_INTERPRET=1``); an unsupported call raises
  :class:`KernelUnsupportedError` with the reason instead of falling back.

Each kernel module of ``optimum_vim_kernels`` exposes ``supports_<op>(...) -> str | None`` (None: supported,
else the reason) next to the launcher, so dispatch never hard-codes which kernel handles what.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
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


class KernelUnsupportedError(RuntimeError):
    """Triton was forced but cannot serve this call (the message says why)."""


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


def _load(module: str):
    try:
        return importlib.import_module(f"optimum_vim_kernels.{module}")
    except ImportError as err:
        return err


def pick_kernel(family: str, op: str, tensor: torch.Tensor, **support_args):
    """Returns the Triton launcher ``optimum_vim_kernels.<family>.<op>`` when the policy and the kernel's
    ``supports_<op>(**support_args)`` allow it, else None (the caller runs the reference)."""
    backend = current_backend()
    if backend is KernelBackend.REFERENCE:
        return None
    if backend is KernelBackend.AUTO and not tensor.is_cuda:
        return None
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
