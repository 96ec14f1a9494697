"""Image processor for Vim: the hustvl/Vim evaluation transform, plus grayscale support for small fixtures."""

from __future__ import annotations

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.processing_utils import ImagesKwargs

_COLOR_MODES = ("RGB", "L")


class VimImageProcessorKwargs(ImagesKwargs, total=False):
    """color_mode (`str`): "RGB" (3 channels) or "L" (1 grayscale channel); inputs are converted to it."""

    color_mode: str


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as PIL's convert("L")


class _VimDefaults:
    """The settings both backends share (the PIL one and the torchvision one)."""

    valid_kwargs = VimImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": 256}
    default_to_square = False
    do_resize = True
    do_center_crop = True
    crop_size = {"height": 224, "width": 224}
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)
    color_mode = "RGB"


class VimImageProcessor(_VimDefaults, PilBackend):
    """Defaults reproduce hustvl/Vim's eval transform: bicubic resize of the short side to 256 (224 / 0.875),
    centre crop 224, rescale to [0, 1], ImageNet mean/std. ``color_mode="L"`` makes single-channel inputs (the
    Fashion-MNIST fixture); RGB inputs are then converted to luminance, grayscale inputs to RGB in the other mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.color_mode not in _COLOR_MODES:
            raise ValueError(f"color_mode must be one of {_COLOR_MODES}; got {self.color_mode!r}")

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        """Converts one image to channel-first numpy with the channel count of ``color_mode``."""
        try:
            from PIL import Image
        except ImportError as err:  # pillow is a dependency; keep the message actionable anyway
            raise ImportError("VimImageProcessor needs Pillow: pip install pillow") from err
        if isinstance(image, Image.Image):
            image = image.convert(self.color_mode)
        array = super().process_image(image, do_convert_rgb=False, input_data_format=input_data_format, **kwargs)
        channels = array.shape[0]
        if self.color_mode == "L" and channels in (3, 4):
            weights = np.asarray(_LUMA, dtype=np.float64)
            array = np.tensordot(weights, array[:3].astype(np.float64), axes=1)[None].astype(array.dtype)
        elif self.color_mode == "RGB" and channels == 1:
            array = np.repeat(array, 3, axis=0)
        elif self.color_mode == "RGB" and channels == 4:
            array = array[:3]
        return array


_FAST = []


def fast_image_processor_class():
    """``VimImageProcessorFast`` (torchvision backend: resizing, cropping and normalising batched tensors, optionally
    on GPU) when torchvision imports, else None (the PIL processor serves alone). Same settings and channel handling
    as :class:`VimImageProcessor`; resized pixels differ slightly (torchvision's antialiased bicubic vs PIL's)."""
    if _FAST:
        return _FAST[0]
    try:
        import torchvision  # noqa: F401
        from transformers.image_processing_backends import TorchvisionBackend
    except (ImportError, RuntimeError):  # PyPI torchvision beside a local torch build can fail with RuntimeError
        return None
    import torch

    class VimImageProcessorFast(_VimDefaults, TorchvisionBackend):
        """torchvision twin of :class:`VimImageProcessor` (``AutoImageProcessor.from_pretrained(..., backend=
        "torchvision")`` / ``use_fast=True``)."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if self.color_mode not in _COLOR_MODES:
                raise ValueError(f"color_mode must be one of {_COLOR_MODES}; got {self.color_mode!r}")

        def process_image(self, image, do_convert_rgb=None, input_data_format=None, device=None, **kwargs):
            """One image as a channel-first tensor with the channel count of ``color_mode``."""
            try:
                from PIL import Image
            except ImportError:
                Image = None
            if Image is not None and isinstance(image, Image.Image):
                image = image.convert(self.color_mode)
            t = super().process_image(image, do_convert_rgb=False, input_data_format=input_data_format,
                                      device=device, **kwargs)
            if self.color_mode == "L" and t.shape[0] in (3, 4):
                w = torch.tensor(_LUMA, dtype=torch.float64, device=t.device)
                t = torch.tensordot(w, t[:3].double(), dims=1)[None].to(t.dtype)
            elif self.color_mode == "RGB" and t.shape[0] == 1:
                t = t.repeat(3, 1, 1)
            elif self.color_mode == "RGB" and t.shape[0] == 4:
                t = t[:3]
            return t

    _FAST.append(VimImageProcessorFast)
    return VimImageProcessorFast


__all__ = ["VimImageProcessor", "fast_image_processor_class"]
