"""Vector quantization of linear weights: sub-vector layout, codebook sizing, seeded k-means codebooks, assignment and
export to the ``QLinear`` codebook format (``optimum_vim.modules.linear``).

Layout: a weight ``W`` (N, K) is cut row by row into ``ceil(K / d)`` sub-vectors of ``d`` consecutive inputs (the
last one zero-padded when ``d`` does not divide ``K``: the padding is decoded and dropped, so it costs index bits but
no accuracy elsewhere). With an optional per-output-channel scale ``s`` (N, 1), the codebook is learnt on
``W / s``, so rows of very different magnitude share one codebook. One codebook (C, d) per layer.

Sizes: a layer stores ``N * ceil(ceil(K/d) * b / 8)`` index bytes (``b = log2 C``), the codebook ``C * d`` and the
scale ``N`` in the codebook dtype (fp16 by default), plus the bias. :func:`choose_codebook_size` shrinks ``C`` for
small layers (``docs``: methods.md §5.2's clamp and the RTN-g32 byte budget).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..modules.spec import CODEBOOK_DTYPES, LinearSpec, VQWeightSpec
from ..primitives import pack_codes, packed_row_bytes
from .kmeans import kmeans

logger = logging.getLogger(__name__)

# methods.md §5.2: VQ4DiT's 3-bit K=64 d=2 and 2-bit K=256 d=4; the 1-bit K=256 d=8 setting is inferred there
DEFAULT_VQ_SETTINGS = {3: (2, 64), 2: (4, 256), 1: (8, 256)}


@dataclass(frozen=True)
class VQLayout:
    """How one linear layer is vector-quantized: its shape, sub-vector width, codebook size and storage dtype."""

    out_features: int
    in_features: int
    vector_dim: int
    codebook_size: int
    channel_scale: bool = False
    codebook_dtype: str = "float16"

    @property
    def num_vectors(self) -> int:
        """Sub-vectors per output row, ``ceil(K / d)``."""
        return -(-self.in_features // self.vector_dim)

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.codebook_size)))

    def spec(self, bias: bool) -> LinearSpec:
        """The ``QLinear`` spec of this layout."""
        weight = VQWeightSpec(self.index_bits, self.vector_dim, self.codebook_size, channel_scale=self.channel_scale,
                              codebook_dtype=self.codebook_dtype)
        return LinearSpec(self.in_features, self.out_features, weight, bias=bias)

    def weight_bytes(self) -> int:
        """Bytes of indices + codebook + channel scale (the bias is counted by neither this nor :func:`rtn_bytes`)."""
        elt = CODEBOOK_DTYPES[self.codebook_dtype].itemsize
        return (self.out_features * packed_row_bytes(self.num_vectors, self.index_bits)
                + self.codebook_size * self.vector_dim * elt + (self.out_features * elt if self.channel_scale else 0))


def rtn_bytes(out_features: int, in_features: int, bits: int, group_size: int | None = 32) -> int:
    """Bytes of the RTN integer format at ``bits`` (packed codes + fp32 per-group or per-channel scales), the size
    budget a codebook layer is held to."""
    groups = 1 if not group_size else -(-in_features // group_size)
    codes = out_features * (in_features if bits == 8 else packed_row_bytes(in_features, bits))
    return codes + out_features * groups * 4


def choose_codebook_size(
    out_features: int,
    in_features: int,
    bits: int,
    vector_dim: int,
    codebook_size: int,
    *,
    channel_scale: bool = False,
    codebook_dtype: str = "float16",
    budget_group_size: int | None = 32,
    min_codebook_size: int = 2,
) -> int:
    """The codebook size a layer gets: ``codebook_size`` halved until

    1. it is at most a quarter of the layer's sub-vectors (methods.md §5.2, VQ4DiT's clamp: every codeword is fitted
       on at least ~4 sub-vectors on average), and
    2. when ``budget_group_size`` is not None, the layer's bytes (indices + codebook + scale) do not exceed RTN's at
       the same ``bits`` with that group size (default g32; our size rule, see the recipe docstring).

    A smaller codebook also shrinks the indices (``log2 C`` bits each), so small layers end up below the nominal rate.
    Raises ValueError when no size >= ``min_codebook_size`` satisfies both rules.
    """
    n_sub = out_features * -(-in_features // vector_dim)
    if codebook_size > n_sub:
        raise ValueError(
            f"a {out_features}x{in_features} weight has {n_sub} sub-vectors of {vector_dim}: a codebook of "
            f"{codebook_size} would hold more codewords than vectors; lower codebook_size or vector_dim"
        )
    size = codebook_size
    while size > min_codebook_size and size > n_sub // 4:
        size //= 2
    if budget_group_size is not None:
        budget = rtn_bytes(out_features, in_features, bits, budget_group_size)

        def fits(c):
            return VQLayout(out_features, in_features, vector_dim, c, channel_scale, codebook_dtype).weight_bytes() <= budget

        while size > min_codebook_size and not fits(size):
            size //= 2
        if not fits(size):
            raise ValueError(
                f"a {out_features}x{in_features} weight cannot be vector-quantized (d={vector_dim}) within the "
                f"{budget} bytes of RTN W{bits} g{budget_group_size}; use size_budget=None, a larger vector_dim "
                "or leave the layer in float / to rtn"
            )
    return size


def split_subvectors(w: torch.Tensor, vector_dim: int) -> torch.Tensor:
    """(N, K) -> (N, ceil(K/d), d), zero-padding the last sub-vector of each row."""
    n, k = w.shape
    pad = -k % vector_dim
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, vector_dim)


def merge_subvectors(v: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N, V, d) -> (N, K): inverse of :func:`split_subvectors` (padding dropped)."""
    return v.reshape(v.shape[0], -1)[:, :in_features]


def channel_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale (N, 1): the row's root-mean-square (never 0), so ``W / s`` has unit-RMS rows."""
    return w.detach().float().pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-8)


def nearest_codewords(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 32768) -> torch.Tensor:
    """Index (M,) of the nearest codeword (squared Euclidean distance, float64, ties to the lower index) of each
    row of ``x`` (M, d)."""
    xd, cd = x.detach().double(), codebook.detach().double().to(x.device)
    out = []
    for start in range(0, xd.shape[0], chunk):
        out.append((xd[start : start + chunk, None, :] - cd[None]).pow(2).sum(-1).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def round_to_storage(t: torch.Tensor, codebook_dtype: str) -> torch.Tensor:
    """``t`` rounded to the storage dtype and back to fp32: what the stored layer will decode."""
    return t.detach().to(CODEBOOK_DTYPES[codebook_dtype]).float()


@dataclass
class VQWeight:
    """A vector-quantized weight: ``codebook`` (C, d) fp32 (already representable in the storage dtype), ``indices``
    (N, V) int64, ``scale`` (N, 1) fp32 or None."""

    layout: VQLayout
    codebook: torch.Tensor
    indices: torch.Tensor
    scale: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        """The (N, K) fp32 weight this represents (equal to the stored layer's ``dequantized_weight()``)."""
        w = merge_subvectors(self.codebook[self.indices], self.layout.in_features)
        return w * self.scale if self.scale is not None else w

    def tensors(self, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ``QLinear`` buffers: packed ``qweight``, ``codebook`` (and ``weight_scale``) in the storage dtype."""
        dtype = CODEBOOK_DTYPES[self.layout.codebook_dtype]
        out = {"qweight": pack_codes(self.indices.cpu(), self.layout.index_bits),
               "codebook": self.codebook.detach().cpu().to(dtype).contiguous()}
        if self.layout.channel_scale:
            out["weight_scale"] = self.scale.detach().cpu().to(dtype).contiguous()
        if bias is not None:
            out["bias"] = bias.detach().cpu().float().clone()
        return out


def kmeans_vq(w: torch.Tensor, layout: VQLayout, *, seed: int = 0, iters: int = 100) -> VQWeight:
    """Plain k-means VQ of ``w`` (N, K) (methods.md §5.2, the "basic VQ" ablation): the shared seeded k-means
    (k-means++ init, ``iters`` Lloyd iterations) over all sub-vectors of the (channel-scaled) weight, codebook rounded
    to the storage dtype, every sub-vector assigned to its nearest stored codeword."""
    w = w.detach().float().cpu()
    if tuple(w.shape) != (layout.out_features, layout.in_features):
        raise ValueError(f"weight shape {tuple(w.shape)} does not match the layout {layout}")
    scale = round_to_storage(channel_scales(w), layout.codebook_dtype) if layout.channel_scale else None
    sub = split_subvectors(w / scale if scale is not None else w, layout.vector_dim).reshape(-1, layout.vector_dim)
    result = kmeans(sub, layout.codebook_size, seed=seed, iters=iters)
    codebook = round_to_storage(result.centroids, layout.codebook_dtype)
    indices = nearest_codewords(sub, codebook).reshape(layout.out_features, layout.num_vectors)
    return VQWeight(layout=layout, codebook=codebook, indices=indices, scale=scale)
