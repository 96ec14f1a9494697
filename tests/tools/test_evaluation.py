"""Evaluation harness: single process, data-parallel under `accelerate launch`, and data-set plumbing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from optimum_vim.data import load_fashion_mnist
from optimum_vim.evaluation import evaluate, load_named_dataset


def test_evaluate_counts_and_matches_manual_top1(tiny_vim_dir):
    model = AutoModelForImageClassification.from_pretrained(tiny_vim_dir)
    processor = AutoImageProcessor.from_pretrained(tiny_vim_dir)
    ds = load_fashion_mnist("test", limit=77)
    result = evaluate(model, ds, processor, batch_size=20, progress=False)
    px = processor(list(ds["image"]), return_tensors="pt").pixel_values
    with torch.no_grad():
        pred = model(px).logits.argmax(-1)
    manual = (pred == torch.tensor(list(ds["label"]))).sum().item()
    assert result.total == 77 and result.correct == manual and result.top1 == manual / 77
    # already processed batches are accepted as well
    batches = [(px[i : i + 30], torch.tensor(list(ds["label"]))[i : i + 30]) for i in range(0, 77, 30)]
    assert evaluate(model, batches, progress=False).correct == manual


def test_named_datasets_and_folders(tmp_path):
    assert len(load_named_dataset("digits", "test")) == 360
    ds = load_named_dataset("fashion-mnist", "test", limit=12)
    for i in range(12):
        folder = tmp_path / "imgs" / ds.features["label"].names[ds[i]["label"]].replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        ds[i]["image"].save(folder / f"{i}.png")
    assert len(load_named_dataset(str(tmp_path / "imgs"))) == 12
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_named_dataset(str(tmp_path / "saved"))) == 12
    with pytest.raises(ValueError, match="unknown data set"):
        load_named_dataset("imagenet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_matches_single_process(tiny_vim_dir):
    args = ["evaluate", tiny_vim_dir, "--dataset", "fashion-mnist", "--limit", "101", "--batch-size", "16", "--json"]
    single = subprocess.run([sys.executable, "-m", "optimum_vim.cli", *args], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    one = json.loads(single.stdout.strip().splitlines()[-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        # accelerate's torchrun launcher (--multi_gpu) runs gloo processes on CPU; --cpu would select mpirun
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "optimum_vim.cli", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    lines = [json.loads(line) for line in launched.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only the main process prints
    two = lines[0]
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert (two["correct"], two["total"]) == (one["correct"], one["total"]) and two["total"] == 101
    assert two["top1"] == one["top1"]
