"""Model-family adapters, target resolution and the recipe registry: what recipes ask instead of naming Vim."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from transformers import AutoModelForImageClassification

import optimum_vim
from optimum_vim import ViMQuantizationConfig
from optimum_vim.models.family import FAMILIES, family_of
from optimum_vim.recipes import RECIPES, LayerSettings, Targets, get_recipe_class

VIM_LINEARS = ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")


@pytest.fixture(scope="module")
def tiny(tiny_vim_dir):
    return AutoModelForImageClassification.from_pretrained(tiny_vim_dir).eval()


def test_the_vim_adapter_runs_the_model_block_by_block(tiny):
    family = family_of(tiny)
    blocks = family.blocks(tiny)
    assert [name for name, _ in blocks] == ["vim.layers.0", "vim.layers.1"]
    pixels = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        state = family.embed(tiny, pixels)
        for _, block in blocks:
            state = family.run_block(block, state)
        hidden, residual = state
        final, _ = tiny.vim.norm_f(hidden, residual, prenorm=True, residual_in_fp32=True)
        expected = tiny(pixel_values=pixels).logits
    layout = family.token_layout(tiny)
    assert (layout.length, layout.grid, layout.class_token) == (50, (7, 7), 24)
    assert family.block_output(state) is hidden
    torch.testing.assert_close(tiny.head(final[:, layout.class_token]), expected)
    assert family.input_shape(tiny) == (1, 28, 28) and family.num_labels(tiny) == 10


def test_units_by_role_name_the_vim_mixer(tiny):
    family = family_of(tiny)
    mixers = family.mixers(tiny)
    assert [m.name for m in mixers] == ["vim.layers.0.mixer", "vim.layers.1.mixer"]
    layout = mixers[0].layout
    assert layout.combine == "gate" and layout.gate == "act_z"
    assert [(d.reverse, d.conv, d.x_proj, d.scan) for d in layout.directions] == [
        (False, "conv1d", "x_proj", "ssm"), (True, "conv1d_b", "x_proj_b", "ssm_b")]
    for d in layout.directions:  # every path of the layout is a module of the mixer
        for path in (d.conv, d.act, d.x_proj, d.dt_proj, d.softplus, d.scan):
            mixers[0].module.get_submodule(path)
    assert family.mixer_dims(mixers[0].module) == (64, 4, 2)
    linears = {ref.name: ref for ref in family.linears(tiny)}
    assert linears["vim.layers.0.mixer.x_proj_b"].reverse and not linears["vim.layers.0.mixer.x_proj"].reverse
    assert linears["head"].role == "head" and linears["vim.layers.1.mixer.dt_proj_b"].role == "dt_proj_b"
    scans = family.scans(tiny)
    assert [(s.name, s.reverse, s.block_index) for s in scans] == [
        ("vim.layers.0.mixer.ssm", False, 0), ("vim.layers.0.mixer.ssm_b", True, 0),
        ("vim.layers.1.mixer.ssm", False, 1), ("vim.layers.1.mixer.ssm_b", True, 1)]
    assert family.default_linear_roles == VIM_LINEARS


def test_a_model_without_an_adapter_is_refused():
    with pytest.raises(TypeError, match=r"no model-family adapter for Linear.*supported model types: \['mambavision', 'vim'\]"):
        family_of(torch.nn.Linear(2, 2))
    assert "vim" in FAMILIES


def test_targets_resolve_skips_and_overrides_in_one_place(tiny):
    cfg = ViMQuantizationConfig(weight_bits=4, act_bits=8, overrides={"*.x_proj*": {"weight_bits": 8},
                                                                      "vim.layers.1.*": None,
                                                                      "*.out_proj": {"act_bits": None}},
                                modules_to_not_convert=["head", "patch_embed", "dt_proj_b"])
    t = Targets.from_config(cfg)
    assert t.settings("vim.layers.0.mixer.in_proj") == LayerSettings(4, 8, None)
    assert t.settings("vim.layers.0.mixer.x_proj_b") == LayerSettings(8, 8, None)
    assert t.settings("vim.layers.0.mixer.out_proj") == LayerSettings(4, None, None)
    assert t.settings("vim.layers.1.mixer.in_proj") is None  # override None: float
    assert t.settings("vim.layers.0.mixer.dt_proj_b") is None  # modules_to_not_convert
    assert t.weight_widths() == {4, 8}
    assert list(t.linears(tiny)) == [f"vim.layers.0.mixer.{n}"  # model order
                                     for n in ("in_proj", "out_proj", "x_proj", "dt_proj", "x_proj_b")]
    assert list(t.linears(tiny, ["in_proj", "head"])) == ["vim.layers.0.mixer.in_proj"]  # head skipped
    assert [m.name for m in t.mixers(tiny)] == ["vim.layers.0.mixer"]
    assert list(t.scans(tiny)) == ["vim.layers.0.mixer.ssm", "vim.layers.0.mixer.ssm_b"]


def test_every_registered_recipe_loads_under_its_name_and_unknown_names_are_refused():
    for name in RECIPES:
        assert get_recipe_class(name).name == name
    with pytest.raises(ValueError, match=r"unknown recipe 'gptq'; available recipes: \['kscale', 'ouromamba'"):
        get_recipe_class("gptq")


def test_recipes_get_args_targets_and_seed_not_the_config():
    cfg = ViMQuantizationConfig(recipe="rtn", weight_bits=4, seed=7, recipe_args={"observer": "percentile"})
    recipe = get_recipe_class("rtn").from_config(cfg)
    assert recipe.seed == 7 and recipe.args.observer == "percentile" and recipe.targets == Targets.from_config(cfg)
    assert not hasattr(recipe, "config")


def test_recipes_and_calibration_name_no_model_class():
    """Recipes and the calibration engine reach the model only through its family adapter: no Vim or MambaVision
    class, module path or module name in their code."""
    root = pathlib.Path(optimum_vim.__file__).parent
    vim_names = re.compile(r"modeling_vim|models\.vim|\bVim[A-Z]\w*|BLOCK_LINEARS|\"(x_proj_b|dt_proj_b|ssm_b|conv1d_b)\""
                           r"|modeling_mambavision|models\.mambavision|\bMambaVision\w*|\"(conv1d_x|conv1d_z|qkv|fc1|fc2)\"")
    offenders = []
    for path in sorted([*(root / "recipes").rglob("*.py"), *(root / "calibration").rglob("*.py")]):
        code = re.sub(r'"""[\s\S]*?"""', "", path.read_text())  # docstrings may cite the papers' Vim modules
        code = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
        offenders += [f"{path.relative_to(root)}: {m.group(0)}" for m in vim_names.finditer(code)]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------ a second family
@pytest.fixture
def toy(monkeypatch):
    """A MambaVision-shaped toy model whose family is registered with its one line (tests/support/toy_family.py)."""
    from optimum_vim.models import family
    from tests.support.toy_family import ToyModel

    monkeypatch.setitem(family.FAMILIES, "toymamba", "tests.support.toy_family:ToyFamily")
    torch.manual_seed(0)
    return ToyModel().eval()


FAST_KSCALE = {"num_clusters": 2, "search_candidates": 11, "search_rounds": 1, "search_images": None}
MIXER = ("in_proj", "x_proj", "dt_proj", "out_proj")


@pytest.mark.parametrize("recipe,bits,args,modules,min_sqnr", [
    ("rtn", (8, 8), {"scan_act_bits": 8}, (*MIXER, "ssm"), 25.0),
    ("kscale", (8, 8), FAST_KSCALE, (*MIXER, "conv1d", "act", "softplus", "ssm", "conv1d_z", "act_z"), 15.0),
    ("ptq4vm", (8, 8), {"steps": 2}, MIXER, 25.0),
    ("ouromamba", (4, 8), {"epochs": 1}, (*MIXER, "ssm"), 10.0),
], ids=["rtn", "kscale", "ptq4vm", "ouromamba"])
def test_every_recipe_calibrates_a_second_family_through_its_adapter(toy, recipe, bits, args, modules, min_sqnr):
    """No recipe names the toy's modules: what they quantize comes from its adapter (roles, mixer layout with a
    concatenated z branch and no gate, single-tensor block stream, no class token)."""
    import copy
    import math

    from optimum_vim.recipes import apply_plan

    pixels = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    cfg = ViMQuantizationConfig(recipe=recipe, weight_bits=bits[0], act_bits=bits[1], recipe_args=args)
    plan = get_recipe_class(recipe).from_config(cfg).calibrate(toy, [pixels])
    mlp = () if recipe == "kscale" else ("fc1", "fc2")  # kscale quantizes the mixers only
    expected = {f"blocks.{i}.{'' if m in mlp else 'mixer.'}{m}" for i in range(2) for m in (*modules, *mlp)}
    assert set(plan.layers) == expected
    quantized = apply_plan(copy.deepcopy(toy), plan)
    with torch.no_grad():
        ref, out = toy(pixels), quantized(pixels)
    sqnr = 10 * math.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert sqnr > min_sqnr, f"{recipe}: logit SQNR {sqnr:.1f} dB"


def test_ouromamba_gen_runs_on_a_family_without_a_class_token(toy):
    """The toy's tokens are one 7x7 sequence per image without a class token (the adapter's default scan grid):
    OuroMamba-Gen reads the pooled output's attention there, seeded."""
    from optimum_vim import generate_calibration_images

    kw = dict(iterations=3, patch_size=3, seed=1, progress=False)
    parts = []
    images = generate_calibration_images(toy, 2, callback=lambda it, ci, p: parts.append(p), **kw)
    assert images.shape == (2, 1, 28, 28) and parts[0]["contrastive"] > 0
    assert torch.equal(images, generate_calibration_images(toy, 2, **kw))
