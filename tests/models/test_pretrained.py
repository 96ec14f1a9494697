"""The integration layer (optimum_vim.pretrained.QuantizableModelMixin) serves any model family, not only Vim: a toy
family that only lists the mixin among its bases and registers with register_model_family gets the loading hints, the
refusals and the reload."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel

from optimum_vim import register_model_family  # importing optimum_vim registers the quantizer
from optimum_vim.hub import write_loading_hints
from optimum_vim.pretrained import QuantizableModelMixin
from optimum_vim.serialization import CheckpointFormatError


class ToyConfig(PreTrainedConfig):
    model_type = "optimum_vim_toy"

    def __init__(self, width: int = 8, **kwargs):
        self.width = width
        super().__init__(**kwargs)


class ToyPreTrainedModel(QuantizableModelMixin, PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "toy"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.normal_(std=0.02)
            module.bias.zero_()


class ToyModel(ToyPreTrainedModel):
    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, pixel_values):
        return self.proj(pixel_values)


register_model_family(ToyConfig, model=ToyModel)
register_model_family(ToyConfig, model=ToyModel)  # idempotent, as import optimum_vim's registration of every family


@pytest.fixture
def toy_dir(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(ToyConfig())
    model.save_pretrained(tmp_path / "toy", model_card=False)
    return tmp_path / "toy", model


def test_new_family_saves_reloads_and_gets_its_own_loading_hints(toy_dir):
    folder, model = toy_dir
    write_loading_hints(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "optimum_vim_loader.ToyConfig", "AutoModel": "optimum_vim_loader.ToyModel"}
    loader = (folder / "optimum_vim_loader.py").read_text()
    assert f"from {__name__} import ToyConfig, ToyModel" in loader and 'model type "optimum_vim_toy"' in loader
    assert "Vim" not in loader
    reloaded = AutoModel.from_pretrained(folder)
    assert type(reloaded) is ToyModel and torch.equal(reloaded.proj.weight, model.proj.weight)


def test_new_family_refuses_a_quantized_config_without_the_quantizer():
    config = ToyConfig(quantization_config={"quant_method": "vim", "layers": {"proj": {}}})
    with pytest.raises(RuntimeError, match="this Toy checkpoint is quantized .*`import optimum_vim`"):
        ToyModel(config)


def test_new_family_refuses_a_quantized_checkpoint_loading_as_float(toy_dir):
    folder, _ = toy_dir
    tensors = load_file(folder / "model.safetensors")
    tensors["proj.qweight"] = torch.zeros(8, 4, dtype=torch.uint8)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="has no quantization_config"):
        AutoModel.from_pretrained(folder)


def test_unregistered_model_type_gets_no_loading_hints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "never_registered"}))
    with pytest.raises(ValueError, match="not registered with transformers' AutoConfig"):
        write_loading_hints(tmp_path)
    assert not (tmp_path / "optimum_vim_loader.py").exists()
