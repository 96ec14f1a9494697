"""An independent float64 re-statement of the official Vim forward pass, for tests only.

It follows hustvl/Vim literally: channel-first (B, E, L) layout, the backward branch on *flipped* x and z with its
own causal conv1d (``F.conv1d`` + crop), a step-by-step scan, ``(out_f + flip(out_b)) / 2``, fp64 everywhere.
It reads official key names (no ``vim.`` prefix) so it can check both the model and the converter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def scan_loop_f64(u, delta, A, B, C, D=None, z=None):
    """Step-by-step S6 scan in float64. u, delta: (b, E, L); A: (E, N); B, C: (b, N, L) -> (b, E, L)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, e, length = u.shape
    h = torch.zeros(b, e, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def rms_norm_f64(x, w, eps=1e-5):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _branch(sd, prefix, suffix, x, z, dt_rank, d_state):
    conv_w = sd[f"{prefix}conv1d{suffix}.weight"].double()
    conv_b = sd[f"{prefix}conv1d{suffix}.bias"].double()
    k = conv_w.shape[-1]
    length = x.shape[-1]
    xc = F.silu(F.conv1d(x, conv_w, conv_b, padding=k - 1, groups=x.shape[1])[..., :length])
    x_dbl = torch.einsum("bel,re->brl", xc, sd[f"{prefix}x_proj{suffix}.weight"].double())
    dt, Bm, Cm = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=1)
    dt = torch.einsum("brl,er->bel", dt, sd[f"{prefix}dt_proj{suffix}.weight"].double())
    delta = F.softplus(dt + sd[f"{prefix}dt_proj{suffix}.bias"].double()[None, :, None])
    a_key = f"{prefix}A_log" if suffix == "" else f"{prefix}A_b_log"
    d_key = f"{prefix}D" if suffix == "" else f"{prefix}D_b"
    A = -torch.exp(sd[a_key].double())
    return scan_loop_f64(xc, delta, A, Bm, Cm, sd[d_key].double(), z)


def reference_logits(sd: dict, pixel_values: torch.Tensor, patch_size: int, stride: int, eps: float = 1e-5):
    """Logits of the official Vim for an official-key state dict ``sd`` (float64 math)."""
    x = F.conv2d(pixel_values.double(), sd["patch_embed.proj.weight"].double(), sd["patch_embed.proj.bias"].double(),
                 stride=stride)
    x = x.flatten(2).transpose(1, 2)
    m = x.shape[1]
    pos = m // 2
    cls = sd["cls_token"].double().expand(x.shape[0], -1, -1)
    x = torch.cat([x[:, :pos], cls, x[:, pos:]], 1) + sd["pos_embed"].double()
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    residual, hidden = None, x
    for i in range(depth):
        p = f"layers.{i}.mixer."
        residual = hidden if residual is None else residual + hidden
        h = rms_norm_f64(residual, sd[f"layers.{i}.norm.weight"], eps)
        d_inner, d_state = sd[p + "A_log"].shape
        dt_rank = sd[p + "dt_proj.weight"].shape[1]
        xz = torch.einsum("bld,fd->bfl", h, sd[p + "in_proj.weight"].double())  # (b, 2E, L)
        x_, z_ = xz.chunk(2, dim=1)
        out_f = _branch(sd, p, "", x_, z_, dt_rank, d_state)
        xz_flip = xz.flip(-1)
        xb, zb = xz_flip.chunk(2, dim=1)
        out_b = _branch(sd, p, "_b", xb, zb, dt_rank, d_state)
        y = (out_f + out_b.flip(-1)) / 2
        hidden = torch.einsum("bel,de->bld", y, sd[p + "out_proj.weight"].double())
    residual = residual + hidden
    out = rms_norm_f64(residual, sd["norm_f.weight"], eps)
    feat = out[:, pos]
    return feat @ sd["head.weight"].double().t() + sd["head.bias"].double()


def official_state_dict(
    hidden=192, depth=24, d_state=16, expand=2, d_conv=4, num_classes=1000, patch=16, seq=197, channels=3,
    dt_rank=None, device="cpu", generator=None,
):
    """Random tensors with exactly the official key/shape table (§1.7 of vim_models.md)."""
    d_inner = expand * hidden
    dt_rank = dt_rank or math.ceil(hidden / 16)
    g = generator
    def rnd(*shape, scale=0.02):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "patch_embed.proj.weight": rnd(hidden, channels, patch, patch, scale=0.05),
        "patch_embed.proj.bias": rnd(hidden),
        "cls_token": rnd(1, 1, hidden, scale=0.5),
        "pos_embed": rnd(1, seq, hidden, scale=0.5),
        "norm_f.weight": 1 + rnd(hidden, scale=0.1),
        "head.weight": rnd(num_classes, hidden, scale=0.1),
        "head.bias": rnd(num_classes),
    }
    for i in range(depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(hidden, scale=0.1)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * d_inner, hidden, scale=hidden**-0.5)
        sd[p + "mixer.out_proj.weight"] = rnd(hidden, d_inner, scale=d_inner**-0.5)
        for sfx in ("", "_b"):
            sd[p + f"mixer.conv1d{sfx}.weight"] = rnd(d_inner, 1, d_conv, scale=0.3)
            sd[p + f"mixer.conv1d{sfx}.bias"] = rnd(d_inner, scale=0.1)
            sd[p + f"mixer.x_proj{sfx}.weight"] = rnd(dt_rank + 2 * d_state, d_inner, scale=d_inner**-0.5)
            sd[p + f"mixer.dt_proj{sfx}.weight"] = rnd(d_inner, dt_rank, scale=dt_rank**-0.5)
            sd[p + f"mixer.dt_proj{sfx}.bias"] = rnd(d_inner, scale=0.5) - 3.0
        if device == "meta":
            a = torch.empty(d_inner, d_state, device="meta")
            sd[p + "mixer.A_log"], sd[p + "mixer.A_b_log"] = a, a.clone()
        else:
            base = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, -1)
            sd[p + "mixer.A_log"] = base + rnd(d_inner, d_state, scale=0.2)
            sd[p + "mixer.A_b_log"] = base + rnd(d_inner, d_state, scale=0.2)
        sd[p + "mixer.D"] = 1 + rnd(d_inner, scale=0.2)
        sd[p + "mixer.D_b"] = 1 + rnd(d_inner, scale=0.2)
    return sd


def scan_inputs(b, length, e, n, dtype=torch.float32, requires_grad=False):
    """Seeded token-major scan inputs u, delta (soft-plussed), A, B, C, D, z of one shape."""
    g = torch.Generator().manual_seed(1000 * b + length + e + n)
    u = torch.randn(b, length, e, generator=g)
    delta = F.softplus(torch.randn(b, length, e, generator=g) - 1.5)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5)
    B = torch.randn(b, length, n, generator=g)
    C = torch.randn(b, length, n, generator=g)
    D = torch.randn(e, generator=g)
    z = torch.randn(b, length, e, generator=g)
    ts = [t.to(dtype).requires_grad_(requires_grad) for t in (u, delta, A, B, C, D, z)]
    return ts


def scan_reference(u, delta, A, B, C, D, z, reverse):
    """The float64 step-by-step scan on token-major inputs (``reverse``: the backward direction)."""
    tr = lambda t: t.transpose(1, 2)  # noqa: E731 - (b, L, x) -> (b, x, L)
    args = [tr(u), tr(delta)]
    bc = [tr(B), tr(C)]
    zz = tr(z) if z is not None else None
    if reverse:
        args, bc = [t.flip(-1) for t in args], [t.flip(-1) for t in bc]
        zz = zz.flip(-1) if zz is not None else None
    y = scan_loop_f64(args[0], args[1], A, bc[0], bc[1], D, zz)
    return tr(y.flip(-1) if reverse else y)
