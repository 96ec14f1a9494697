"""Saving and publishing: one folder with weights, config, processor, model card (and plot), one Hub commit.

transformers' own ``push_to_hub`` replaces README.md with a default card; Vim models override ``push_to_hub`` to
upload the folder written here in a single commit instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CARD_INFO_ATTR = "_vim_card_info"


def set_card_info(model, **info) -> None:
    """Attaches facts for the model card (``accuracy``, ``sizes``, ``benchmark_table``, ``training``,
    ``base_model``) to ``model``; ``save_pretrained`` / ``push_to_hub`` render them."""
    current = dict(getattr(model, CARD_INFO_ATTR, {}) or {})
    current.update({k: v for k, v in info.items() if v is not None})
    setattr(model, CARD_INFO_ATTR, current)


def write_model_card(model, folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Renders the card (and the accuracy-vs-bits plot when a benchmark table is attached) into ``folder``."""
    from .cards import plot_accuracy_vs_bits, render_model_card

    folder = Path(folder)
    info = dict(getattr(model, CARD_INFO_ATTR, {}) or {})
    plot_file = None
    table = info.get("benchmark_table")
    if table:
        plot_file = "accuracy_vs_bits.png"
        plot_accuracy_vs_bits(table, folder / plot_file)
    card = render_model_card(
        model, repo_id=repo_id, base_model=info.get("base_model"), accuracy=info.get("accuracy"),
        sizes=info.get("sizes"), benchmark_table=table, plot_file=plot_file, training=info.get("training"),
        license=info.get("license"),
    )
    path = folder / "README.md"
    card.save(path)
    return path


def atomic_save(save_fn, save_directory: str | os.PathLike) -> Path:
    """Runs ``save_fn(tmp_dir)`` into a sibling temporary folder and moves the files into ``save_directory`` only
    when it succeeded, so a failed save leaves no half-written checkpoint behind."""
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        save_fn(tmp)
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir()):
            dest = target / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_for_hub(model, folder: str | os.PathLike, processor=None, repo_id: str | None = None, **save_kwargs) -> Path:
    """Writes everything a Hub repo of this model needs into ``folder``: weights, config, processor, card."""

    def _save(tmp: Path) -> None:
        model.save_pretrained(tmp, **save_kwargs)
        if processor is not None:
            processor.save_pretrained(tmp)
        write_model_card(model, tmp, repo_id=repo_id)

    return atomic_save(_save, folder)


def push_model_to_hub(
    model,
    repo_id: str,
    processor=None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: str | int = "50GB",
    endpoint: str | None = None,
) -> str:
    """Publishes model + processor + rendered card to ``repo_id`` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token if isinstance(token, str) else None)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    qc = getattr(model.config, "quantization_config", None)
    default_msg = f"Upload {'quantized ' if qc is not None else ''}Vim with optimum-vim"
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hub(model, tmp, processor=processor, repo_id=repo_id, max_shard_size=max_shard_size)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, commit_message=commit_message or default_msg, revision=revision,
            create_pr=create_pr, repo_type="model",
        )
    logger.info("pushed %s", repo_id)
    return str(getattr(info, "commit_url", info))


def load_benchmark_table(path: str | os.PathLike) -> list[dict]:
    """Rows written by ``benchmarks/accuracy.py --json``."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all({"recipe", "weight_bits", "top1"} <= set(r) for r in rows):
        raise ValueError(f"{path} is not a benchmark table (a JSON list of rows with recipe, weight_bits, top1)")
    return rows
