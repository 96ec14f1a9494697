"""Fine-tuning quantized Vims: straight-through gradients through every quantizer, Trainer (train + evaluate),
trainable scales, linear probing, gradient checkpointing, LoRA adapters on quantized linears (save / reload)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from optimum_vim import ViMQuantizationConfig
from optimum_vim.modules import QLinear
from optimum_vim.training import enable_scale_training, prepare_linear_probe, straight_through

CALIB = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(3))

SETTINGS = {
    "rtn-w4a8": dict(weight_bits=4, act_bits=8),  # integer GEMM path (int8 codes) in inference
    "rtn-w4a4-token": dict(weight_bits=4, act_bits=4, recipe_args={"act_granularity": "token"}),
    "vimvq-w2": dict(recipe="vimvq", weight_bits=2,
                     recipe_args={"kmeans_iterations": 5, "convex": False, "incremental": False}),
    "kscale-w8a8": dict(recipe="kscale", weight_bits=8, act_bits=8,  # int8 scan inputs + 8-bit carried state
                        recipe_args={"search_candidates": 5, "search_rounds": 1}),
    "ouromamba-w4a4": dict(recipe="ouromamba", weight_bits=4, act_bits=4,  # dynamic outliers
                           recipe_args={"num_synthetic": 8, "gen_iterations": 2, "epochs": 1}),
}


def _quantize(path, **kw):
    cfg = ViMQuantizationConfig(calibration_dataset=CALIB, num_calibration_samples=16, **kw)
    return AutoModelForImageClassification.from_pretrained(path, quantization_config=cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _args(tmp_path, **kw):
    kw = {"num_train_epochs": 1, "learning_rate": 1e-3, **kw}
    return TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             report_to=[], use_cpu=True, save_strategy="no", seed=0, **kw)


@pytest.fixture(scope="module")
def w4a8(tiny_vim_dir):
    return _quantize(tiny_vim_dir, weight_bits=4, act_bits=8)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_gradients_reach_the_input_through_every_quantizer(tiny_vim_dir, setting):
    """Before the training path the integer kernels cut the graph: no gradient reached the patch pixels."""
    q = _quantize(tiny_vim_dir, **SETTINGS[setting])
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inference = q(x).logits
    xg = x.clone().requires_grad_(True)
    q.train()
    trained = q(xg).logits
    torch.testing.assert_close(trained, inference, rtol=1e-4, atol=1e-5)  # same function, float summation order
    trained.square().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert q.vim.layers[0].mixer.A_log.grad.abs().sum() > 0  # reached through the quantized scan


def test_eval_mode_keeps_the_integer_path_unless_asked(w4a8):
    """A plain call of an eval-mode model with grad mode on (upstream float parameters require grad) computes what
    no_grad computes, bit for bit; straight_through() makes the same eval-mode call differentiable."""
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    w4a8.eval()
    with torch.no_grad():
        inference = w4a8(x).logits
    plain = w4a8(x).logits
    assert torch.equal(plain, inference)
    assert not w4a8.vim.layers[0].mixer.in_proj.training
    xg = x.clone().requires_grad_(True)
    with straight_through():
        ste = w4a8(xg).logits
    torch.testing.assert_close(ste, inference, rtol=1e-4, atol=1e-5)
    ste.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    assert not w4a8.vim.layers[0].mixer.in_proj.training  # the context switched no module's mode


def test_ste_gradient_of_a_quantized_linear(w4a8):
    """d/dx of QLinear with a straight-through input quantizer: W^T g inside the quantizer's range, 0 outside."""
    layer = w4a8.vim.layers[0].mixer.in_proj
    iq = layer.input_quantizer
    lo = float(iq.scale * (iq.qmin - iq.zero_point))
    hi = float(iq.scale * (iq.qmax - iq.zero_point))
    x = torch.linspace(2 * lo, 2 * hi, 3 * 50 * layer.in_features).reshape(3, 50, layer.in_features)
    x.requires_grad_(True)
    g = torch.randn(3, 50, layer.out_features)
    with straight_through():
        (layer(x) * g).sum().backward()
    codes = torch.round(x.detach() / iq.scale) + iq.zero_point  # before the clamp
    inside = ((codes >= iq.qmin) & (codes <= iq.qmax)).float()
    expected = (g @ layer.dequantized_weight()) * inside
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
    assert (inside == 0).any() and (inside == 1).any()


def test_trainer_trains_and_evaluates_a_quantized_model_with_trainable_scales(tiny_vim_dir, tmp_path):
    q = _quantize(tiny_vim_dir, weight_bits=4, act_bits=8)
    assert q.hf_quantizer.is_trainable and q.hf_quantizer.is_qat_trainable
    names = enable_scale_training(q)
    layer = q.vim.layers[0].mixer.in_proj
    assert "vim.layers.0.mixer.in_proj.weight_scale" in names and "vim.layers.0.mixer.in_proj.input_quantizer.scale" in names
    codes, scale, norm = layer.qweight.clone(), layer.weight_scale.detach().clone(), q.vim.norm_f.weight.detach().clone()
    trainer = Trainer(model=q, args=_args(tmp_path), train_dataset=_Data(32, 0), eval_dataset=_Data(16, 1))
    result = trainer.train()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(result.training_loss)) and "eval_loss" in metrics
    assert torch.equal(layer.qweight, codes)  # weights stay frozen as codes
    assert not torch.equal(layer.weight_scale.detach(), scale) and not torch.equal(q.vim.norm_f.weight.detach(), norm)
    q.save_pretrained(tmp_path / "tuned")  # same tensor names: reloads into buffers, bit-identical
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "tuned")
    assert "weight_scale" in dict(again.vim.layers[0].mixer.in_proj.named_buffers())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x).logits, q(x).logits)


def test_enable_scale_training_refuses_a_float_model(tiny_vim_dir):
    fp = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    with pytest.raises(ValueError, match="no quantization scale"):
        enable_scale_training(fp)


def test_linear_probe_trains_the_head_only_on_integer_kernels(tiny_vim_dir, tmp_path, count_calls):
    from optimum_vim.modules import linear

    q = _quantize(tiny_vim_dir, weight_bits=4, act_bits=8)
    assert prepare_linear_probe(q) == ["head.weight", "head.bias"]
    frozen = {n: p.detach().clone() for n, p in q.named_parameters() if not n.startswith("head")}
    head = q.head.weight.detach().clone()
    gemm = count_calls(linear, "quant_gemm", check=lambda a, *args, **kw: _int_codes(a))
    Trainer(model=q, args=_args(tmp_path, max_steps=2), train_dataset=_Data(16, 0)).train()
    assert gemm["n"] > 0  # the quantized linears kept their int8-activation GEMMs while training
    assert all(torch.equal(p, frozen[n]) for n, p in q.named_parameters() if n in frozen)
    assert not torch.equal(q.head.weight.detach(), head)


def _int_codes(a):
    if a.is_floating_point():
        raise AssertionError("a frozen quantized layer left the integer path during linear probing")


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "w4a8"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_vim_dir, w4a8, quantized):
    model = w4a8 if quantized else AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    x, labels = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])

    def grads():
        model.zero_grad()
        model(x, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in model.vim.layers)
    checkpointed = grads()
    model.activation_checkpointing_disable()
    model.eval()
    assert plain.keys() == checkpointed.keys() and len(plain) > 5
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_on_quantized_linears_trains_saves_and_reloads(tiny_vim_dir, tmp_path):
    pytest.importorskip("peft")  # the [train] extra; installed by [dev], so CI runs this
    from optimum_vim.training import LoraQLinear, add_lora, load_lora_adapter

    q = _quantize(tiny_vim_dir, weight_bits=4, act_bits=8)
    q.save_pretrained(tmp_path / "q")
    model = add_lora(q, r=4, lora_alpha=8, modules_to_save=["head"])
    wrapped = [m for m in model.modules() if isinstance(m, LoraQLinear)]
    assert len(wrapped) == 12 and all(isinstance(m.get_base_layer(), QLinear) for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    Trainer(model=model, args=_args(tmp_path, max_steps=3, learning_rate=1e-2), train_dataset=_Data(24, 0)).train()
    assert any(m.lora_B["default"].weight.abs().sum() > 0 for m in wrapped)  # B starts at zero: it trained
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x).logits
    base = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert not torch.equal(base(x).logits, expected)
    reloaded = load_lora_adapter(base, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, expected)
    with pytest.raises(NotImplementedError, match="re-quantize"):
        reloaded.merge_and_unload()


def test_quantize_on_load_returns_every_module_in_eval_mode(tiny_vim_dir):
    """from_pretrained returns an eval-mode model; the quantized modules swapped in by the recipe used to stay in
    train mode (a fresh module's default), so a plain call with grad mode on took the training path."""
    q = _quantize(tiny_vim_dir, weight_bits=4, act_bits=8)
    assert not any(m.training for m in q.modules())
    q.train()
    assert all(m.training for m in q.modules())
