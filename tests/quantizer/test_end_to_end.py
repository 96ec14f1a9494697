"""quantize -> fine-tune (Trainer, then LoRA) -> export -> push -> load from the Hub, as the README's script does it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support.hub_server import LoopbackHub


@pytest.mark.slow
def test_quantize_finetune_export_push_load(tiny_vim_dir, tmp_path):
    pytest.importorskip("peft")
    script = textwrap.dedent(f"""
        import json, torch
        import optimum_vim
        from optimum_vim import ViMQuantizationConfig
        from optimum_vim.export import export_program
        from optimum_vim.training import add_lora, enable_scale_training, load_lora_adapter
        from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

        class Data(torch.utils.data.Dataset):
            def __init__(self, n):
                g = torch.Generator().manual_seed(n)
                self.x, self.y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
            def __len__(self):
                return len(self.x)
            def __getitem__(self, i):
                return {{"pixel_values": self.x[i], "labels": self.y[i]}}

        path = {tiny_vim_dir!r}
        args = TrainingArguments({str(tmp_path / "run")!r}, max_steps=2, per_device_train_batch_size=8, report_to=[],
                                 use_cpu=True, save_strategy="no")
        # 1. quantize
        config = ViMQuantizationConfig(weight_bits=4, act_bits=8, calibration_dataset=torch.randn(16, 1, 28, 28))
        model = AutoModelForImageClassification.from_pretrained(path, quantization_config=config)
        # 2. fine-tune with Trainer (float parameters + scales), then LoRA adapters on the quantized linears
        enable_scale_training(model)
        Trainer(model=model, args=args, train_dataset=Data(16), eval_dataset=Data(8)).train()
        lora = add_lora(model, r=4, modules_to_save=["head"])
        Trainer(model=lora, args=args, train_dataset=Data(16)).train()
        lora.save_pretrained({str(tmp_path / "adapter")!r})
        model = lora.unload()  # the quantized model again (the head trained by LoRA's modules_to_save is kept)
        # 3. export with a dynamic batch
        program = export_program(model)
        x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            expected = model(x).logits
            assert torch.allclose(program.module()(x), expected, atol=1e-5)
        # 4. push (weights, processor, card in one commit)
        url = model.push_to_hub("org/vim-tuned", processor=AutoImageProcessor.from_pretrained(path))
        torch.save(expected, {str(tmp_path / "expected.pt")!r})
        torch.save(x, {str(tmp_path / "x.pt")!r})
        print(json.dumps({{"url": url}}))
    """)
    reload = textwrap.dedent(f"""
        import json, torch
        import optimum_vim
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained("org/vim-tuned")  # 5. load from the Hub
        with torch.no_grad():
            same = torch.equal(model(torch.load({str(tmp_path / "x.pt")!r})).logits,
                               torch.load({str(tmp_path / "expected.pt")!r}))
        print(json.dumps({{"same": same, "layer": type(model.vim.layers[0].mixer.in_proj).__name__}}))
    """)
    with LoopbackHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_loopback", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        first = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        second = subprocess.run([sys.executable, "-c", reload], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        files = sorted(hub.state.repos["org/vim-tuned"].files)
    assert json.loads(second.stdout.strip().splitlines()[-1]) == {"same": True, "layer": "QLinear"}
    assert "model.safetensors" in files and "README.md" in files
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert torch.load(tmp_path / "expected.pt").shape == (3, 10)
