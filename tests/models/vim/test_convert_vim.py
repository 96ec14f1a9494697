"""Converter from official hustvl/Vim .pth files: exact key/shape table, inference of sizes, refusals, safety."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

import optimum_vim  # noqa: F401
from optimum_vim.models.vim.convert_vim_checkpoint import (
    CheckpointConversionError,
    convert_vim_checkpoint,
    infer_vim_config,
    load_official_checkpoint,
)
from tests.support.reference_vim import official_state_dict, reference_logits

# the five released midclstok models: (name, hidden, seq, stride, dt_rank, exact parameter count)
OFFICIAL = [
    ("tiny", 192, 197, 16, 12, 7_148_008),
    ("tiny+ (stride 8)", 192, 730, 8, 12, 7_148_008 + 533 * 192),
    ("small", 384, 197, 16, 24, 25_796_584),
    ("small+ (stride 8)", 384, 730, 8, 24, 25_796_584 + 533 * 384),
    ("base", 768, 197, 16, 48, 97_598_440),
]


@pytest.mark.parametrize("name,hidden,seq,stride,dt_rank,n_params", OFFICIAL, ids=[o[0] for o in OFFICIAL])
def test_infer_config_for_all_five_official_shapes(name, hidden, seq, stride, dt_rank, n_params):
    sd = official_state_dict(hidden=hidden, seq=seq, device="meta")
    assert len(sd) == 7 + 24 * 17 == 415
    assert sum(t.numel() for t in sd.values()) == n_params
    assert sd["layers.0.mixer.x_proj.weight"].shape == (dt_rank + 32, 2 * hidden)
    cfg = infer_vim_config(sd)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.d_state, cfg.expand, cfg.stride) == (hidden, 24, 16, 2, stride)
    assert cfg.time_step_rank == dt_rank and cfg.sequence_length == seq and cfg.num_labels == 1000
    assert cfg.id2label[0].startswith("tench") and cfg.id2label[999].startswith("toilet tissue")
    with torch.device("meta"):
        model = optimum_vim.VimForImageClassification(cfg)
    hf = {("vim." + k if not k.startswith("head.") else k): v for k, v in sd.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in hf.items()}


def _save_official(path, sd, model_name="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"):
    ema = {k: v + 1 for k, v in sd.items()}
    ckpt = {
        "model": sd, "model_ema": ema, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "lr_scheduler": {"t_in_epochs": True}, "epoch": 299, "scaler": "none",
        "args": argparse.Namespace(model=model_name, batch_size=128, lr=5e-4, data_path="/imagenet"),
    }
    torch.save(ckpt, path)


def _small_official(stride=16, depth=2, seed=0):
    seq = 197 if stride == 16 else 730
    return official_state_dict(hidden=192, depth=depth, seq=seq, generator=torch.Generator().manual_seed(seed))


def test_convert_roundtrip_matches_official_forward(tmp_path):
    sd = _small_official()
    ckpt = tmp_path / "vim_t_midclstok_76p1acc.pth"
    _save_official(ckpt, sd)
    out = convert_vim_checkpoint(ckpt, tmp_path / "hf")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "optimum_vim_loader.py", "preprocessor_config.json"]
    card = (out / "README.md").read_text()
    assert "Vision Mamba" in card and "library_name: optimum-vim" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "vim" and cfg["stride"] == 16 and cfg["num_hidden_layers"] == 2
    assert len(cfg["id2label"]) == 1000
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    proc = AutoImageProcessor.from_pretrained(out)
    assert proc.crop_size["height"] == 224 and proc.size["shortest_edge"] == 256
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = model(x).logits
    torch.testing.assert_close(logits.double(), reference_logits(sd, x, 16, 16), rtol=3e-4, atol=3e-4)


def test_convert_ema_weights(tmp_path):
    sd = _small_official()
    ckpt = tmp_path / "ckpt.pth"
    _save_official(ckpt, sd)
    ema = load_official_checkpoint(ckpt, use_ema=True)
    assert torch.equal(ema["cls_token"], sd["cls_token"] + 1)


def test_stride8_checkpoint_refuses_stride16_config(tmp_path):
    sd = _small_official(stride=8)
    ckpt = tmp_path / "vim_t_midclstok_ft_78p3acc.pth"
    _save_official(ckpt, sd, "vim_tiny_patch16_stride8_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2")
    with pytest.raises(CheckpointConversionError, match="stride=8 but stride=16 was requested.*730"):
        convert_vim_checkpoint(ckpt, tmp_path / "hf", stride=16)
    assert not (tmp_path / "hf").exists()
    out = convert_vim_checkpoint(ckpt, tmp_path / "hf8")
    assert json.loads((out / "config.json").read_text())["stride"] == 8


def test_missing_v2_keys_refused(tmp_path):
    sd = _small_official()
    v2_only = [k for k in sd if any(part in ("conv1d_b", "x_proj_b", "dt_proj_b", "A_b_log", "D_b") for part in k.split("."))]
    assert len(v2_only) == 2 * 7  # per layer: conv1d_b (w, b), x_proj_b, dt_proj_b (w, b), A_b_log, D_b
    for k in v2_only:
        del sd[k]
    ckpt = tmp_path / "v1.pth"
    _save_official(ckpt, sd)
    with pytest.raises(CheckpointConversionError, match="not a bimamba v2 checkpoint"):
        convert_vim_checkpoint(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_legacy_rope_checkpoint_refused(tmp_path):
    sd = _small_official()
    sd["rope.freqs_cos"] = torch.zeros(196, 96)
    sd["rope.freqs_sin"] = torch.zeros(196, 96)
    ckpt = tmp_path / "vim_tiny_73p1.pth"
    _save_official(ckpt, sd, "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_rope_also_residual_with_cls_token")
    with pytest.raises(CheckpointConversionError, match="legacy"):
        convert_vim_checkpoint(ckpt, tmp_path / "hf")
    del sd["rope.freqs_cos"], sd["rope.freqs_sin"]
    with pytest.raises(CheckpointConversionError, match="legacy"):
        infer_vim_config({**sd, "rope.freqs_cos": torch.zeros(1)})


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_untrusted_pickle_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "evil.pth"
    with open(ckpt, "wb") as f:
        # a torch.save-like zip is not needed: weights_only refuses any non-allow-listed global in plain pickles too
        pickle.dump({"model": _small_official(depth=1), "args": _Evil()}, f, protocol=2)
    with pytest.raises(CheckpointConversionError, match="weights-only"):
        convert_vim_checkpoint(ckpt, tmp_path / "hf")
    assert not (tmp_path / "PWNED").exists()
    sd = _small_official(depth=1)
    torch.save({"model": sd, "args": _Evil()}, tmp_path / "evil2.pth")
    with pytest.raises(CheckpointConversionError, match="weights-only"):
        load_official_checkpoint(tmp_path / "evil2.pth")
    assert not (tmp_path / "PWNED").exists()


def test_not_a_vim_checkpoint(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointConversionError, match="not a Vim checkpoint"):
        convert_vim_checkpoint(tmp_path / "x.pth", tmp_path / "hf")
    with pytest.raises(FileNotFoundError):
        convert_vim_checkpoint(tmp_path / "missing.pth", tmp_path / "hf")


def test_output_dir_must_be_empty(tmp_path):
    sd = _small_official(depth=1)
    _save_official(tmp_path / "c.pth", sd)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_vim_checkpoint(tmp_path / "c.pth", tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "x"
