"""Model cards rendered from the templates in ``model_cards/templates`` (shipped as ``optimum_vim.model_cards``)."""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)


def template_text(name: str) -> str:
    """Text of ``model_cards/templates/<name>.md`` (wheel: package data; source checkout: the repo folder)."""
    try:
        return resources.files("optimum_vim.model_cards").joinpath(f"{name}.md").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        repo = Path(__file__).resolve().parents[2] / "model_cards" / "templates" / f"{name}.md"
        if repo.exists():
            return repo.read_text()
        raise FileNotFoundError(
            f"model card template {name!r} not found (looked in optimum_vim.model_cards and {repo}); "
            "reinstall optimum-vim (`pip install -e .` in a checkout)"
        ) from None


def _facts(config) -> dict:
    """The family's own words for the card (its config's ``model_card_facts()``: ``family``, ``short_name``,
    ``tags``, ``architecture``, ``tokens``); a family without them gets its model type."""
    facts = getattr(config, "model_card_facts", None)
    if facts is not None:
        return facts()
    kind = str(getattr(config, "model_type", "model"))
    return {"family": kind, "short_name": kind, "tags": [kind], "architecture": type(config).__name__,
            "tokens": "-"}


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _is_repo_id(name) -> bool:
    """Whether ``name`` has the form of a Hub id ("org/name"). Decided by form only: what a name means on disk depends
    on the current directory, so the decision "local folder or Hub repo" is taken when the model is loaded
    (:func:`optimum_vim.quantizer.run_recipe` records ``base_model`` then)."""
    return bool(name) and _REPO_ID.match(str(name)) is not None and ".." not in str(name)


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if isinstance(x, float) and x <= 1 else str(x)


def plot_accuracy_vs_bits(rows: list[dict], path: str | Path) -> Path:
    """Line plot of top-1 against weight bits, one line per (recipe, activation bits); rows are benchmark rows
    with ``recipe``, ``weight_bits``, ``act_bits``, ``top1`` (and an optional ``fp`` row with recipe "fp")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row.get("recipe") == "fp":
            ax.axhline(100 * row["top1"], color="gray", linestyle="--", label="float")
            continue
        label = f"{row['recipe']} A{row['act_bits'] or 'fp'}"
        series.setdefault(label, []).append((row["weight_bits"], 100 * row["top1"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("weight bits")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render_model_card(
    model,
    repo_id: str | None = None,
    base_model: str | None = None,
    accuracy: dict | None = None,
    sizes: list[dict] | None = None,
    benchmark_table: list[dict] | None = None,
    plot_file: str | None = None,
    training: dict | None = None,
    license: str | None = None,
):
    """Renders the card of a float or quantized model of any registered family as a ``huggingface_hub.ModelCard``.

    Args:
        repo_id: the Hub id the card will live under (used in the usage snippet).
        base_model: Hub id of the float model a quantized model derives from (``base_model`` metadata).
        accuracy: ``{"dataset", "top1", "fp_top1", "command"}`` measured accuracy.
        sizes: rows ``{"name", "bytes"}`` for a size table.
        benchmark_table: rows ``{"recipe", "weight_bits", "act_bits", "top1"}`` (shown, and plotted when
            ``plot_file`` names the image written next to the card).
        training: ``{"data", "command", "seed", "wall", "accuracy"}`` for a float model's training record.
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    qc = getattr(config, "quantization_config", None)
    repo_id = repo_id or "path/to/this/model"
    facts = _facts(config)
    tags = [*facts["tags"], "optimum-vim", "transformers", "image-classification"]
    name = repo_id.split("/")[-1]
    eval_results = _eval_results(accuracy)
    tags += [t for t in (getattr(model, "model_tags", None) or []) if t not in tags]
    if isinstance(qc, dict):
        from ..quantization_config import ViMQuantizationConfig

        qc = ViMQuantizationConfig.from_dict(qc)
    if qc is not None:
        scheme = f"W{qc.weight_bits}" + (f"A{qc.act_bits}" if qc.act_bits else "A16 (weight-only)")
        tags += ["quantized", qc.recipe, scheme.split(" ")[0].lower()]
        base = base_model or getattr(qc, "base_model", None)
        hub_base = base if _is_repo_id(base) else None
        data = ModelCardData(
            library_name=LIBRARY_NAME, pipeline_tag="image-classification", tags=tags, license=license,
            base_model=hub_base, base_model_relation="quantized" if hub_base else None,
            model_name=name if eval_results else None, eval_results=eval_results,
        )
        from ..modules.spec import spec_from_dict, spec_kind
        from ..size import bits_per_weight

        layers = qc.layers or {}
        kinds = sorted({spec_kind(spec_from_dict(spec)) for spec in layers.values()})

        bpw = bits_per_weight(model)
        card = ModelCard.from_template(
            data,
            template_str=template_text("quantized"),
            title=f"{repo_id.split('/')[-1]} ({scheme}, {qc.recipe})",
            scheme=scheme,
            base_model_name=base or f"a float {facts['short_name']}",
            family=facts["family"],
            short_name=facts["short_name"],
            base_model_link=f"https://huggingface.co/{hub_base}" if hub_base else None,
            architecture=facts["architecture"],
            repo_id=repo_id,
            recipe=qc.recipe,
            format_version=qc.format_version,
            weight_bits=qc.weight_bits,
            act_bits=qc.act_bits or "float (weight-only)",
            group_size=qc.weight_group_size or "per output channel",
            num_layers=len(layers),
            layer_kinds=", ".join(kinds) or "-",
            skipped=", ".join(qc.modules_to_not_convert) or "nothing",
            calibration=(
                f"{qc.calibration_source}, seed {qc.seed}" if str(qc.calibration_source).startswith("calibrated on")
                else f"{qc.calibration_source}, {qc.num_calibration_samples} samples, seed {qc.seed}"
                if qc.calibration_source not in (None, "none") else "none (data-free for these settings)"
            ),
            recipe_args=qc.recipe_args or "defaults",
            bits_per_weight=f"{bpw:.3f}" if bpw == bpw else "-",
            accuracy={k: (_fmt(v) if k.endswith("top1") else v) for k, v in accuracy.items()} if accuracy else None,
            sizes=sizes,
            plot=plot_file,
            benchmark_rows=[{**r, "top1": _fmt(r["top1"]), "act_bits": r.get("act_bits") or "-"} for r in benchmark_table]
            if benchmark_table else None,
        )
        return _marked(card)
    data = ModelCardData(library_name=LIBRARY_NAME, pipeline_tag="image-classification", tags=tags, license=license,
                         model_name=name if eval_results else None, eval_results=eval_results)
    return _marked(ModelCard.from_template(
        data,
        template_str=template_text("float"),
        title=repo_id.split("/")[-1],
        family=facts["family"],
        short_name=facts["short_name"],
        architecture=facts["architecture"],
        repo_id=repo_id,
        num_parameters=f"{model.num_parameters():,}",
        image_size=config.image_size,
        num_channels=config.num_channels,
        tokens=facts["tokens"],
        num_labels=config.num_labels,
        training=training,
    ))


# the Hub's library name of these repos: transformers alone cannot load them (the model type and the quantizer are
# registered by `import optimum_vim`), so the card and metadata name the package to install
LIBRARY_NAME = "optimum-vim"

# Hub dataset ids of the data sets optimum-vim evaluates on by name (model-index "dataset.type")
_DATASET_IDS = {"fashion-mnist": "zalando-datasets/fashion_mnist", "mnist-subset": "ylecun/mnist",
                "imagenet-1k": "ILSVRC/imagenet-1k"}


def _eval_results(accuracy: dict | None):
    """``model-index`` entries (top-1 accuracy) from the card's ``accuracy`` facts, or None."""
    if not accuracy or not isinstance(accuracy.get("top1"), (int, float)):
        return None
    from huggingface_hub import EvalResult

    label = str(accuracy.get("dataset", "evaluation data"))
    key = accuracy.get("dataset_id") or label.split(" ")[0]
    return [EvalResult(
        task_type="image-classification", task_name="Image Classification", dataset_type=_DATASET_IDS.get(key, key),
        dataset_name=label, dataset_split=accuracy.get("split"), metric_type="accuracy", metric_name="top-1 accuracy",
        metric_value=round(float(accuracy["top1"]), 6),
    )]


# Generated sections carry a marker with a hash of their text, so a later push can tell an untouched generated section
# (replaced by the new rendering) from one the user edited on the Hub (kept), and from the user's own sections (kept)
_MARK = re.compile(r"^<!-- optimum-vim:section (\S+) ([0-9a-f]{12}) -->$", re.M)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.strip().encode()).hexdigest()[:12]


def _split_sections(body: str) -> list[tuple[str, str]]:
    """Markdown body -> ``[(heading or "intro", text)]`` cut before each ``## `` heading (fenced code respected)."""
    sections, current, name, fence = [], [], "intro", False
    for line in body.splitlines(keepends=True):
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            sections.append((name, "".join(current)))
            current, name = [], line[3:].strip()
        current.append(line)
    sections.append((name, "".join(current)))
    return [(n, t) for n, t in sections if t.strip()]


def _marked(card):
    """The card with a hash marker closing each generated section."""
    sections = _split_sections(card.text)
    out = []
    for name, text in sections:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "intro"
        out.append(f"{text.rstrip()}\n\n<!-- optimum-vim:section {slug} {_digest(text)} -->\n\n")
    card.text = "".join(out)
    return card


def merge_card(remote_text: str, new_text: str) -> str:
    """Merges a freshly rendered card into the card already on the Hub (as transformers' own push merges tags):

    * metadata: the remote keys are kept, the keys this card generates are updated, tags are the union, and
      ``model-index`` is replaced only when this card has evaluation results;
    * body: a generated section whose text is unchanged since it was generated is replaced by its new rendering; a
      generated section the user edited, and every section the user added, stays as it is; new generated sections
      are appended.
    """
    from huggingface_hub import ModelCard

    remote, new = ModelCard(remote_text, ignore_metadata_errors=True), ModelCard(new_text)
    meta = remote.data.to_dict()
    generated = new.data.to_dict()
    for key, value in generated.items():
        if key == "tags":
            meta["tags"] = list(dict.fromkeys([*(meta.get("tags") or []), *value]))
        elif value is not None:
            meta[key] = value
    fresh = {m.group(1): (text, m.group(2)) for text in _chunks(new.text) if (m := _MARK.search(text))}
    body, used = [], set()
    for text in _chunks(remote.text):
        m = _MARK.search(text)
        if m is None or m.group(1) not in fresh:
            body.append(text)  # the user's own section, or one this version no longer generates
            continue
        slug, recorded = m.group(1), m.group(2)
        untouched = _digest(_MARK.sub("", text)) == recorded
        body.append(fresh[slug][0] if untouched else text)
        used.add(slug)
    body += [text for slug, (text, _) in fresh.items() if slug not in used]
    from huggingface_hub import ModelCardData

    return str(ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n" + "".join(body)))


def _chunks(text: str) -> list[str]:
    """The body cut after each section marker (a chunk ends with its marker; a trailing chunk may have none)."""
    out, last = [], 0
    for m in _MARK.finditer(text):
        end = m.end()
        out.append(text[last:end].lstrip("\n") + "\n\n")
        last = end
    tail = text[last:].strip()
    if tail:
        out.append(tail + "\n")
    return out
