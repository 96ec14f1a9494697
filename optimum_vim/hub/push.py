"""Saving and publishing: one folder with weights, config, processor, model card (and plot), one Hub commit.

transformers' own ``push_to_hub`` replaces README.md with a default card; :func:`push_model_to_hub` uploads the folder
the model's ``save_pretrained`` writes (card included) in a single commit instead. Models of every family get it as
their ``push_to_hub`` (:class:`optimum_vim.pretrained.QuantizableModelMixin` delegates here), and their
``save_pretrained`` writes the card and loading hints with :func:`write_model_card` / :func:`write_loading_hints`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..serialization import atomic_save

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
        try:
            plot_accuracy_vs_bits(table, folder / "accuracy_vs_bits.png")
            plot_file = "accuracy_vs_bits.png"
        except ImportError:
            logger.warning("matplotlib is not installed: the model card gets the benchmark table without the "
                           "accuracy-vs-bits plot (pip install 'optimum-vim[plot]' to add it)")
    card = render_model_card(
        model, repo_id=repo_id, base_model=info.get("base_model"), accuracy=info.get("accuracy"),
        sizes=info.get("sizes"), benchmark_table=table, plot_file=plot_file, training=info.get("training"),
        license=info.get("license"),
    )
    path = folder / "README.md"
    card.save(path)
    return path


REMOTE_CODE_FILE = "optimum_vim_loader.py"
_REMOTE_CODE = '''"""Loader of this optimum-vim checkpoint for `trust_remote_code=True` (config.json's auto_map points here).

The model type "{model_type}" and its quantizer come from the optimum-vim package: `pip install optimum-vim`. With it installed,
the usual way needs no remote code: `import optimum_vim`, then `from_pretrained` this folder or repo.
"""

import optimum_vim  # noqa: F401 - registers the {family} model type, image processor and quantizer with transformers
from {module} import {names}  # noqa: F401
'''
# the Auto classes a saved folder maps to the loader (when the model type is registered with them)
_AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForImageClassification", "AutoImageProcessor")


def _auto_classes(model_type: str) -> dict[str, type]:
    """{Auto class name: this model type's class} from transformers' registries (filled by optimum-vim's
    registration); a model type that an Auto class does not know is left out of it."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model type {model_type!r} is not registered with transformers' AutoConfig: "
                         "register the model family (optimum_vim/_registration.py) before saving")
    config_class = CONFIG_MAPPING[model_type]
    found = {"AutoConfig": config_class}
    for auto in _AUTO_CLASSES[1:-1]:
        mapping = getattr(transformers, auto)._model_mapping
        if config_class in mapping:
            found[auto] = mapping[config_class]
    processors = IMAGE_PROCESSOR_MAPPING[config_class] if config_class in IMAGE_PROCESSOR_MAPPING else None
    processor = processors.get("pil") if isinstance(processors, dict) else processors
    if isinstance(processor, type):
        found["AutoImageProcessor"] = processor
    return found


def _common_module(modules: set[str]) -> str:
    """The one module that defines every class, else the package the modules share (which exports them)."""
    parts = [m.split(".") for m in modules]
    common = os.path.commonprefix(parts) if len(parts) > 1 else parts[0]
    return ".".join(common)


def write_loading_hints(folder: str | os.PathLike) -> None:
    """Makes a saved folder loadable, or at least explain itself, in a process that did not ``import optimum_vim``:
    config.json gets an ``auto_map`` to a five-line loader that imports optimum-vim. Without ``trust_remote_code``
    transformers then asks for it instead of suggesting a transformers upgrade; with it, a missing optimum-vim is
    reported as "requires ... optimum_vim, run pip install"; with optimum-vim installed the folder loads.
    The classes are those registered with transformers for config.json's ``model_type`` (any model family)."""
    import optimum_vim

    from ..pretrained import family_name

    folder = Path(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    classes = _auto_classes(config["model_type"])
    names = sorted(cls.__name__ for cls in classes.values())
    exported = all(getattr(optimum_vim, cls.__name__, None) is cls for cls in classes.values())
    module = "optimum_vim" if exported else _common_module({cls.__module__ for cls in classes.values()})
    (folder / REMOTE_CODE_FILE).write_text(_REMOTE_CODE.format(
        model_type=config["model_type"], family=family_name(classes["AutoConfig"]), module=module,
        names=", ".join(names)))
    loader = REMOTE_CODE_FILE.removesuffix(".py")
    config["auto_map"] = {auto: f"{loader}.{classes[auto].__name__}" for auto in _AUTO_CLASSES if auto in classes}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_with_remote_card(api, repo_id: str, folder: str | os.PathLike, revision: str | None = None) -> bool:
    """Before a push: merges ``folder/README.md`` into the repo's current card (:func:`optimum_vim.hub.cards.merge_card`:
    user edits and sections are kept). Returns whether a remote card existed."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from .cards import merge_card

    local = Path(folder) / "README.md"
    if not local.exists():
        return False
    try:
        remote = Path(api.hf_hub_download(repo_id, "README.md", revision=revision, repo_type="model"))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return False
    local.write_text(merge_card(remote.read_text(), local.read_text()))
    return True


def save_for_hub(model, folder: str | os.PathLike, processor=None, repo_id: str | None = None, **save_kwargs) -> Path:
    """Writes everything a Hub repo of this model needs into ``folder``: weights, config, processor, card."""

    def _save(tmp: Path) -> None:
        model.save_pretrained(tmp, repo_id=repo_id, **save_kwargs)
        if processor is not None:
            processor.save_pretrained(tmp)

    return atomic_save(_save, folder)


def push_model_to_hub(model, repo_id: str, processor=None, *, commit_message: str | None = None,
                      commit_description: str | None = None, private: bool | None = None,
                      token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                      max_shard_size: int | str | None = "50GB", tags: list[str] | None = None) -> str:
    """Publishes model + processor + rendered card to ``repo_id`` in one commit; what ``model.push_to_hub`` runs.
    The arguments are transformers' ``push_to_hub`` ones (``commit_message``, ``commit_description``, ``private``,
    ``token``, ``revision``, ``create_pr``, ``max_shard_size``, ``tags``). An existing card on the Hub is merged, not
    replaced (:func:`merge_with_remote_card`). Returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    from ..pretrained import family_name

    if tags:
        model.add_model_tags(tags)
    api = HfApi(token=token if isinstance(token, str) else None)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id
    quantized = getattr(model.config, "quantization_config", None) is not None
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, repo_id=repo_id, max_shard_size=max_shard_size or "50GB")
        if processor is not None:
            processor.save_pretrained(tmp)
        merge_with_remote_card(api, repo_id, tmp, revision)  # keep what the user edited in the card on the Hub
        info = api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision, create_pr=create_pr,
            commit_message=commit_message
            or f"Upload {'quantized ' if quantized else ''}{family_name(model.config)} with optimum-vim",
            commit_description=commit_description,
        )
    logger.info("pushed %s", repo_id)
    return str(getattr(info, "commit_url", info))


def load_benchmark_table(path: str | os.PathLike) -> list[dict]:
    """Rows written by ``benchmarks/accuracy.py --json``."""
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all({"recipe", "weight_bits", "top1"} <= set(r) for r in rows):
        raise ValueError(f"{path} is not a benchmark table (a JSON list of rows with recipe, weight_bits, top1)")
    return rows
