"""Activation statistics gathered with forward hooks during calibration passes (the model is never modified)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

_SAMPLES_PER_BATCH = 1 << 16  # values kept per batch and module for percentile observers


class ActivationStats:
    """Running statistics of one activation tensor stream of shape (batch, L, C)."""

    def __init__(self, seed: int = 0):
        self.count = 0
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
        flat = x.flatten().cpu()
        if flat.numel() > _SAMPLES_PER_BATCH:
            idx = torch.randint(0, flat.numel(), (_SAMPLES_PER_BATCH,), generator=self._gen)
            flat = flat[idx]
        self._samples.append(flat)

    def percentile_range(self, pct: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) = the (100 - pct) and pct percentiles of the sampled values."""
        values = torch.cat(self._samples)
        n = values.numel()
        k_hi = max(1, min(n, int(round(pct / 100.0 * n))))
        k_lo = max(1, min(n, int(round((100.0 - pct) / 100.0 * n))))
        hi = values.kthvalue(k_hi).values
        lo = values.kthvalue(k_lo).values
        return lo, hi


@contextlib.contextmanager
def _hooks(model: nn.Module, names: list[str], where: str, stats: dict[str, ActivationStats]):
    handles = []
    modules = dict(model.named_modules())
    for name in names:
        mod = modules[name]
        if where == "input":
            handles.append(mod.register_forward_pre_hook(lambda m, args, n=name: stats[n].update(args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, args, out, n=name: stats[n].update(out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_activation_stats(
    model: nn.Module, batches: list[torch.Tensor], names: list[str], where: str = "input", seed: int = 0,
    desc: str = "calibrating",
) -> dict[str, ActivationStats]:
    """Runs ``model`` on every batch and returns the statistics of the inputs (or outputs) of ``names``."""
    stats = {name: ActivationStats(seed=seed + i) for i, name in enumerate(names)}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _hooks(model, names, where, stats):
            for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
                model(batch.to(device))
    finally:
        model.train(was_training)
    return stats
