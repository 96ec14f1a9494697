"""MambaVision: forward equivalence with the official NVlabs code, the released models' key/shape tables, Hub and
.pth.tar loading, backbone features, image processor, and the building blocks."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

import optimum_vim  # noqa: F401 - registers the vim quantizer
from optimum_vim.models.mambavision import (
    MAMBAVISION_PRESETS,
    MambaVisionBackbone,
    MambaVisionConfig,
    MambaVisionForImageClassification,
    MambaVisionImageProcessor,
    register_mambavision_with_transformers,
)
from optimum_vim.models.mambavision.convert_mambavision_checkpoint import (
    convert_mambavision_checkpoint,
    infer_mambavision_config,
    official_to_hf_state_dict,
)
from optimum_vim.models.vim.convert_vim_checkpoint import CheckpointConversionError
from optimum_vim.modules.float import SelectiveScan, TokenConv1d
from optimum_vim.ops.dispatch import KernelBackend, use_kernels

register_mambavision_with_transformers()

SMALL = dict(dim=16, in_dim=8, depths=[1, 2, 3, 4], num_heads=[1, 2, 2, 4], window_size=[4, 4, 4, 2], mlp_ratio=4,
             num_classes=10, layer_scale=1e-5, layer_scale_conv=1e-5)
# even and odd stage depths (mixer / attention split), no layer scale, other widths and MLP ratio
ODD = dict(dim=24, in_dim=8, depths=[2, 1, 5, 2], num_heads=[1, 1, 3, 6], window_size=[4, 4, 3, 2], mlp_ratio=2,
           num_classes=7)
T_KWARGS = {**{k: v for k, v in MAMBAVISION_PRESETS["T"].items() if k not in ("crop_pct", "layer_scale")}, "mlp_ratio": 4}
HEADS_WINDOWS = {"small": (SMALL["num_heads"], SMALL["window_size"]), "odd": (ODD["num_heads"], ODD["window_size"])}
ATOL = 1e-5  # logits; the official scan runs in float64 (shim), ours in float32


@pytest.fixture(scope="module")
def official(run_official):
    """The official model's outputs on random weights: a small model with both layer scales (a square input and one
    that needs window padding), one with odd depths and no layer scale, MambaVision-T at 224; plus the key/shape
    tables of the six released models."""
    spec = {
        "cases": [
            {"name": "small", "seed": 0, "kwargs": SMALL, "inputs": [[2, 3, 64, 64], [1, 3, 56, 72]]},
            {"name": "odd", "seed": 1, "kwargs": ODD, "inputs": [[2, 3, 48, 48]]},
            {"name": "T", "seed": 2, "kwargs": T_KWARGS, "inputs": [[1, 3, 224, 224]]},
        ],
        "shape_tables": [f"mamba_vision_{name}" for name in MAMBAVISION_PRESETS],
    }
    return run_official(spec)


def _ours(case: dict, name: str) -> MambaVisionForImageClassification:
    heads, windows = HEADS_WINDOWS.get(name, (None, None))
    config = infer_mambavision_config(case["state_dict"], num_heads=heads, window_size=windows)
    model = MambaVisionForImageClassification(config).eval()
    model.load_state_dict(official_to_hf_state_dict(case["state_dict"]), strict=True)
    return model


@pytest.mark.slow
def test_runs_the_official_file(official):
    assert official["module_file"].replace("\\", "/").endswith("mambavision/models/mamba_vision.py")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "odd", "T"])
def test_forward_matches_official(official, name):
    case = official["cases"][name]
    model = _ours(case, name)
    for out in case["outputs"]:
        with torch.no_grad():
            ours = model(out["pixel_values"], output_hidden_states=True)
        assert out["logits"].abs().max() > 0.1  # a non-degenerate comparison
        torch.testing.assert_close(ours.logits, out["logits"], atol=ATOL, rtol=0)
        for i in range(1, 5):
            ref = out["features"][f"stage{i}"]
            torch.testing.assert_close(ours.hidden_states[i], ref, atol=ATOL * max(1.0, ref.abs().max().item()), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(MAMBAVISION_PRESETS))
def test_released_models_key_and_shape_tables(official, preset):
    """Our classifier's state dict is the official one (``model.`` prefix, head at the top), and the config inferred
    from the official tensors is the released model's."""
    table = official["shape_tables"][f"mamba_vision_{preset}"]
    config = MambaVisionConfig.from_preset(preset)
    with torch.device("meta"):
        model = MambaVisionForImageClassification(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {(k if k.startswith("head.") else "model." + k): v for k, v in table.items()}
    meta_state = {k: torch.empty(v, device="meta") for k, v in table.items()}
    inferred = infer_mambavision_config(meta_state)
    for field in ("depths", "num_heads", "window_size", "dim", "in_dim", "mlp_ratio", "drop_path_rate", "d_state",
                  "d_conv", "expand", "dt_rank", "qkv_bias", "num_labels", "num_channels"):
        assert getattr(inferred, field) == getattr(config, field), field
    assert (inferred.layer_scale is None) == (MAMBAVISION_PRESETS[preset]["layer_scale"] is None)
    assert inferred.crop_pct == MAMBAVISION_PRESETS[preset]["crop_pct"]
    assert inferred.id2label[0] == config.id2label[0] and len(inferred.id2label) == 1000


def _hub_folder(path, state: dict, kwargs: dict, **extra) -> None:
    """A folder laid out like nvidia/MambaVision-*: remote-code config.json and ``model.``-prefixed safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({"model." + k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    config = {
        "architectures": ["MambaVisionModelForImageClassification"],
        "auto_map": {"AutoConfig": "configuration_mambavision.MambaVisionConfig",
                     "AutoModel": "modeling_mambavision.MambaVisionModel",
                     "AutoModelForImageClassification": "modeling_mambavision.MambaVisionModelForImageClassification"},
        "model_type": "mambavision", "transformers_version": "4.50.0", "torch_dtype": "float32",
        **{k: kwargs[k] for k in ("depths", "num_heads", "window_size", "dim", "in_dim", "mlp_ratio")},
        "drop_path_rate": 0.2, "layer_scale": kwargs.get("layer_scale"), "layer_scale_conv": kwargs.get("layer_scale_conv"),
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center",
        # a slice of the training-argument dump some repos carry
        "lr": 0.005, "epochs": 310, "model": "mamba_vision_T", "torchscript": False, "img_size": 224,
        **extra,
    }
    (path / "config.json").write_text(json.dumps(config))


def test_hub_folder_loads_directly_and_round_trips(official, tmp_path):
    case = official["cases"]["small"]
    _hub_folder(tmp_path / "hub", case["state_dict"], SMALL, num_classes=SMALL["num_classes"])
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "hub").eval()
    assert isinstance(model, MambaVisionForImageClassification) and model.config.num_labels == 10
    out = case["outputs"][1]
    with torch.no_grad():
        torch.testing.assert_close(model(out["pixel_values"]).logits, out["logits"], atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "saved").eval()
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    base = AutoModel.from_pretrained(tmp_path / "hub").eval()
    with torch.no_grad():
        torch.testing.assert_close(base(out["pixel_values"]).pooler_output, out["pooled"], atol=ATOL, rtol=0)
    backbone = MambaVisionBackbone.from_pretrained(tmp_path / "hub", out_features=["stem", "stage2", "stage4"]).eval()
    with torch.no_grad():
        maps = backbone(out["pixel_values"]).feature_maps
    assert [m.shape[1] for m in maps] == backbone.channels == [16, 32, 128]
    for got, name in zip(maps[1:], ("stage2", "stage4")):
        ref = out["features"][name]
        torch.testing.assert_close(got, ref, atol=ATOL * max(1.0, ref.abs().max().item()), rtol=0)


def test_hub_config_without_labels_gets_imagenet_labels(tmp_path):
    """The released repos' config.json has no id2label: the head has the 1,000 ImageNet classes, not 2."""
    config = {"model_type": "mambavision", "auto_map": {"AutoModel": "modeling_mambavision.MambaVisionModel"},
              **{k: MAMBAVISION_PRESETS["T"][k] for k in ("depths", "num_heads", "window_size", "dim", "in_dim")},
              "mlp_ratio": 4, "drop_path_rate": 0.2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MambaVisionConfig)
    assert loaded.num_labels == 1000 and loaded.id2label[1] == "goldfish, Carassius auratus"


def _pth(path, state: dict, **extra) -> None:
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3, "version": 2,
                "args": argparse.Namespace(model=extra.pop("model", "mamba_vision_T"), lr=0.005, epochs=310),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.005, "params": [0, 1]}]}, **extra}, path)


def test_convert_official_pth_tar(official, tmp_path):
    case = official["cases"]["odd"]
    _pth(tmp_path / "ckpt.pth.tar", case["state_dict"], model="custom_mamba_vision")
    folder = convert_mambavision_checkpoint(tmp_path / "ckpt.pth.tar", tmp_path / "out", num_heads=ODD["num_heads"],
                                            window_size=ODD["window_size"])
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    out = case["outputs"][0]
    with torch.no_grad():
        torch.testing.assert_close(model(out["pixel_values"]).logits, out["logits"], atol=ATOL, rtol=0)
    assert model.config.depths == ODD["depths"] and model.config.layer_scale is None
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, MambaVisionImageProcessor)
    # the official remote-code auto_map is gone; what is left is the package's own loader (as for every family)
    assert all(v.startswith("optimum_vim_loader.")
               for v in json.loads((folder / "config.json").read_text()).get("auto_map", {}).values())
    from PIL import Image
    from transformers import pipeline

    image = Image.new("RGB", (64, 48), (30, 120, 200))
    with torch.no_grad():
        expected = model(processor(image, return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    top = pipeline("image-classification", model=str(folder))(image, top_k=2)
    assert top[0]["label"] == model.config.id2label[int(expected.argmax())]
    assert abs(top[0]["score"] - expected.max().item()) < 1e-5


def test_convert_hub_folder_uses_its_transform(official, tmp_path):
    case = official["cases"]["small"]
    _hub_folder(tmp_path / "hub", case["state_dict"], SMALL, num_classes=SMALL["num_classes"])
    folder = convert_mambavision_checkpoint(tmp_path / "hub", tmp_path / "native")
    saved = json.loads((folder / "config.json").read_text())
    assert all(v.startswith("optimum_vim_loader.") for v in saved.get("auto_map", {}).values()) and saved["num_heads"] == SMALL["num_heads"]
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 256} and processor["crop_size"] == {"height": 224, "width": 224}
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    out = case["outputs"][0]
    with torch.no_grad():
        torch.testing.assert_close(model(out["pixel_values"]).logits, out["logits"], atol=ATOL, rtol=0)


class _NotAllowed:
    pass


def test_convert_refuses_other_pickled_globals(official, tmp_path):
    case = official["cases"]["small"]
    _pth(tmp_path / "evil.pth.tar", case["state_dict"], payload=_NotAllowed())
    with pytest.raises(CheckpointConversionError, match="Unsupported global"):
        convert_mambavision_checkpoint(tmp_path / "evil.pth.tar", tmp_path / "out", num_heads=SMALL["num_heads"],
                                       window_size=SMALL["window_size"])
    assert not (tmp_path / "out").exists()


def test_convert_errors_name_the_fix(official, tmp_path):
    state = official["cases"]["small"]["state_dict"]
    with pytest.raises(CheckpointConversionError, match=r"num_heads=\[\.\.\.\]"):
        infer_mambavision_config(state)  # not a released size: heads / windows must be given
    meta_t = {k: torch.empty(v, device="meta") for k, v in official["shape_tables"]["mamba_vision_T"].items()}
    with pytest.raises(CheckpointConversionError, match="MambaVision-S has depths"):
        infer_mambavision_config(meta_t, preset="S")
    with pytest.raises(CheckpointConversionError, match="not a MambaVision checkpoint"):
        infer_mambavision_config({"patch_embed.proj.weight": torch.zeros(1)})
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("")
    with pytest.raises(FileExistsError):
        convert_mambavision_checkpoint(tmp_path / "missing.pth.tar", tmp_path / "nonempty")


def test_config_validation():
    with pytest.raises(ValueError, match="4 positive ints"):
        MambaVisionConfig(depths=[1, 2, 3])
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        MambaVisionConfig(dim=20, num_heads=[1, 1, 3, 3])
    with pytest.raises(ValueError, match="unknown MambaVision model"):
        MambaVisionConfig.from_preset("XL")
    assert MambaVisionConfig.from_preset("nvidia/MambaVision-L2-1K").depths == [3, 3, 12, 5]
    assert list(MambaVisionConfig(depths=[1, 1, 5, 4]).mixer_blocks(2)) == [0, 1, 2]
    assert list(MambaVisionConfig(depths=[1, 1, 5, 4]).mixer_blocks(3)) == [0, 1]


def test_image_processor_reads_the_model_crop():
    t2 = MambaVisionImageProcessor.from_model_config(MambaVisionConfig.from_preset("T2"))
    assert t2.size == {"shortest_edge": 228} and t2.crop_size == {"height": 224, "width": 224}
    squash = MambaVisionImageProcessor.from_model_config(
        MambaVisionConfig(image_size=512, crop_pct=0.93, crop_mode="squash"))
    assert squash.size == {"height": 550, "width": 550}
    from PIL import Image

    image = Image.new("RGB", (300, 250), (200, 10, 10))
    pixels = t2(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert pixels[0, 0].mean() > 1.0 > pixels[0, 1].mean()  # red channel high after ImageNet normalisation


@pytest.mark.parametrize("kernel_size", [3, 4])
def test_same_conv_on_the_causal_op(kernel_size):
    conv = TokenConv1d(6, kernel_size, padding="same", bias=False)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(2, 9, 6)
    ref = F.conv1d(x.transpose(1, 2), conv.weight, None, padding="same", groups=6).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref, atol=1e-6, rtol=0)  # fused CPU kernel
        with use_kernels(KernelBackend.REFERENCE):
            torch.testing.assert_close(conv(x), ref, atol=1e-6, rtol=0)


def test_scan_goes_through_the_dispatch_and_trains():
    """Fused CPU kernels and the PyTorch reference agree; with autograd the scan and conv backpropagate into every
    mixer parameter."""
    config = MambaVisionConfig(**{k: v for k, v in SMALL.items() if k != "num_classes"}, num_labels=3)
    torch.manual_seed(0)
    model = MambaVisionForImageClassification(config).eval()
    scans = [m for m in model.modules() if isinstance(m, SelectiveScan)]
    assert len(scans) == sum(len(config.mixer_blocks(s)) for s in (2, 3))
    calls = []
    for m in scans:
        m.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        fused = model(x).logits
        with use_kernels(KernelBackend.REFERENCE):
            reference = model(x).logits
    assert len(calls) == 2 * len(scans)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)
    model.train()
    loss = model(x, labels=torch.tensor([0, 2])).loss
    loss.backward()
    mixer = model.model.levels[2].blocks[0].mixer
    for name in ("A_log", "D"):
        assert getattr(mixer, name).grad.abs().sum() > 0, name
    for name in ("in_proj", "conv1d_x", "conv1d_z", "x_proj", "dt_proj", "out_proj"):
        assert getattr(mixer, name).weight.grad.abs().sum() > 0, name


def test_registration_is_idempotent():
    register_mambavision_with_transformers()
    register_mambavision_with_transformers()
    assert isinstance(AutoConfig.for_model("mambavision"), MambaVisionConfig)


def test_hub_config_of_a_512px_model_wins_over_the_preset(official):
    """MambaVision-L2-512-21K has L2's tensors but other windows, resolution and crop: its config.json decides."""
    meta = {k: torch.empty(v, device="meta") for k, v in official["shape_tables"]["mamba_vision_L2"].items()}
    hub = {"window_size": [8, 8, 32, 16], "input_size": [3, 512, 512], "crop_pct": 0.93, "crop_mode": "squash",
           "layer_scale": 1e-5}
    config = infer_mambavision_config(meta, hub_config=hub)
    assert config.window_size == [8, 8, 32, 16] and config.num_heads == MAMBAVISION_PRESETS["L2"]["num_heads"]
    assert config.image_size == 512
    processor = MambaVisionImageProcessor.from_model_config(config)
    assert processor.size == {"height": 550, "width": 550} and processor.crop_size == {"height": 512, "width": 512}
