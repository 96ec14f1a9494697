"""Image processor for MambaVision: the official eval transform (timm's ``create_transform`` with the model's
``crop_pct`` / ``crop_mode``, bicubic, ImageNet mean and std), on the Vim processor's backend (grayscale support
for small fixtures included)."""

from __future__ import annotations

import math

from ..vim.image_processing_vim import VimImageProcessor


class MambaVisionImageProcessor(VimImageProcessor):
    """Defaults: the eval transform of MambaVision-T/B/L/L2 (``crop_pct`` 1.0): bicubic resize of the short side to
    224, centre crop 224, rescale to [0, 1], ImageNet mean/std. :meth:`from_model_config` reads the crop of any
    model (T2 0.98, S 0.93, ``crop_mode="squash"``)."""

    size = {"shortest_edge": 224}

    @classmethod
    def from_model_config(cls, config, **kwargs) -> MambaVisionImageProcessor:
        """The processor matching a :class:`MambaVisionConfig`, reading the eval-transform fields the Hub
        config.json carries (``crop_pct``, ``crop_mode``, ``mean``, ``std``) beside ``image_size``: timm resizes to
        ``floor(image_size / crop_pct)`` (the short side for ``"center"``, both sides for ``"squash"``) and crops
        ``image_size``."""
        side = int(config.image_size)
        crop_pct = float(getattr(config, "crop_pct", None) or 1.0)
        mode = getattr(config, "crop_mode", None) or "center"
        if mode not in ("center", "squash"):
            raise ValueError(f"crop_mode {mode!r} is not supported; MambaVision uses 'center' or 'squash'")
        scaled = math.floor(side / crop_pct)
        settings = {
            "size": {"height": scaled, "width": scaled} if mode == "squash" else {"shortest_edge": scaled},
            "crop_size": {"height": side, "width": side},
            "color_mode": "RGB" if config.num_channels == 3 else "L",
        }
        for ours, theirs in (("image_mean", "mean"), ("image_std", "std")):
            value = getattr(config, theirs, None)
            if value is not None:
                settings[ours] = list(value)
        settings.update(kwargs)
        return cls(**settings)


__all__ = ["MambaVisionImageProcessor"]
