"""Activation statistics gathered with forward hooks during calibration passes (the model is never modified)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

_SAMPLES_PER_BATCH = 1 << 16  # values kept per batch and module for percentile observers


class ActivationStats:
    """Running statistics of one activation tensor stream of shape (batch, L, C)."""

    def __init__(self, seed: int = 0, keep_samples: bool = True):
        self.count = 0
        self.keep_samples = keep_samples  # a random subset of values per batch, for percentile_range only
        self.min = None  # scalar
        self.max = None
        self.token_min = None  # (L,)
        self.token_max = None
        self.channel_absmax = None  # (C,)
        self.token_absmean = None  # (L,) running sum of mean |x| per position
        self.channel_absmean = None  # (C,)
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    @staticmethod
    def _merge(old, new, fn):
        return new if old is None else fn(old, new)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = x.reshape(-1, *x.shape[-2:])
        a = x.abs()
        self.min = self._merge(self.min, x.amin(), torch.minimum)
        self.max = self._merge(self.max, x.amax(), torch.maximum)
        self.token_min = self._merge(self.token_min, x.amin(dim=(0, 2)), torch.minimum)
        self.token_max = self._merge(self.token_max, x.amax(dim=(0, 2)), torch.maximum)
        self.channel_absmax = self._merge(self.channel_absmax, a.amax(dim=(0, 1)), torch.maximum)
        self.token_absmean = self._merge(self.token_absmean, a.mean(dim=(0, 2)) * x.shape[0], torch.add)
        self.channel_absmean = self._merge(self.channel_absmean, a.mean(dim=(0, 1)) * x.shape[0], torch.add)
        self.count += x.shape[0]
        if not self.keep_samples:
            return
        flat = x.flatten()
        if flat.numel() > _SAMPLES_PER_BATCH:  # indices drawn on the CPU (same draw on any device), gathered there
            idx = torch.randint(0, flat.numel(), (_SAMPLES_PER_BATCH,), generator=self._gen)
            flat = flat[idx.to(flat.device)]
        self._samples.append(flat.cpu())

    def percentile_range(self, pct: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) = the (100 - pct) and pct percentiles of the sampled values."""
        if not self._samples:
            raise ValueError("these statistics were collected with keep_samples=False; percentiles need the samples "
                             "(collect_activation_stats(..., keep_samples=True))")
        values = torch.cat(self._samples)
        n = values.numel()
        k_hi = max(1, min(n, int(round(pct / 100.0 * n))))
        k_lo = max(1, min(n, int(round((100.0 - pct) / 100.0 * n))))
        hi = values.kthvalue(k_hi).values
        lo = values.kthvalue(k_lo).values
        return lo, hi


def _normalise_targets(names, where: str) -> dict[str, tuple[str, str, int]]:
    """``names`` is a list of module names (their first input / their output) or a dict
    ``key -> (module name, "input" | "output", positional argument index)``."""
    if isinstance(names, dict):
        return dict(names)
    return {n: (n, where, 0) for n in names}


@contextlib.contextmanager
def _hooks(model: nn.Module, targets: dict[str, tuple[str, str, int]], stats: dict[str, ActivationStats]):
    handles = []
    modules = dict(model.named_modules())
    by_module: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for key, (name, where, idx) in targets.items():
        if name not in modules:
            raise ValueError(f"no module named {name!r} to observe")
        by_module.setdefault((name, where), []).append((key, idx))
    for (name, where), keys in by_module.items():
        mod = modules[name]
        if where == "input":
            def pre(m, args, keys=keys):
                for key, idx in keys:
                    stats[key].update(args[idx])
            handles.append(mod.register_forward_pre_hook(pre))
        else:
            def post(m, args, out, keys=keys):
                for key, _ in keys:
                    stats[key].update(out)
            handles.append(mod.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, batches: list[torch.Tensor], names, where: str = "input", seed: int = 0,
    desc: str = "calibrating", keep_samples: bool = True,
) -> dict[str, ActivationStats]:
    """Runs ``model`` on every batch and returns statistics of the observed tensors.

    ``names``: module names (their first input, or output with ``where="output"``), or a dict
    ``key -> (module name, "input" | "output", positional argument index)`` to observe several inputs of a module
    (e.g. u, delta, B, C of a scan). The model is not modified; hooks are removed afterwards. ``keep_samples=False``
    skips the random value samples that only :meth:`ActivationStats.percentile_range` reads (min-max observers).
    """
    targets = _normalise_targets(names, where)
    stats = {key: ActivationStats(seed=seed + i, keep_samples=keep_samples) for i, key in enumerate(targets)}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _hooks(model, targets, stats):
            for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
                model(batch.to(device))
    finally:
        model.train(was_training)
    return stats
