"""The integration layer every model family's ``PreTrainedModel`` shares: loading, saving, the model card and the Hub.

A family's base class lists :class:`QuantizableModelMixin` before transformers' ``PreTrainedModel``::

    class VimPreTrainedModel(QuantizableModelMixin, PreTrainedModel):
        config_class = VimConfig
        ...

and the model file then holds only the model (modules, weight init, forward). The mixin adds, for any family:

- ``__init__``: refuses a config whose ``quantization_config`` is still an optimum-vim dict (the quantizer is not
  registered with transformers, so packed integers would load as float weights);
- ``from_pretrained``: a ``ViMQuantizationConfig`` passed for an already quantized checkpoint contributes only its
  loading options (``dequantize``) to the checkpoint's own config;
- ``_load_pretrained_model``: refuses a quantized checkpoint about to load as a float model;
- ``save_pretrained``: atomic, byte-reproducible, with the model card and loading hints of :mod:`optimum_vim.hub`
  and the quantized modules' specs under this model's own names; ``push_to_hub=True`` publishes the folder;
- ``push_to_hub``: transformers' arguments plus ``processor=``, delegated to :func:`optimum_vim.hub.push_model_to_hub`;
- ``num_parameters`` / ``get_memory_footprint``: a quantized layer counts the weights it stands for, and the CPU
  kernels' caches count in the footprint.

The hub package is imported when a card is written or a model pushed, never when a model module is imported.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

from transformers import PreTrainedConfig

logger = logging.getLogger(__name__)

# from_pretrained arguments that locate config.json (forwarded when the config is read ahead of the weights)
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
# save_pretrained(push_to_hub=True) arguments that belong to push_to_hub
_PUSH_KWARGS = ("commit_message", "commit_description", "private", "revision", "create_pr", "tags")


class QuantizableModelMixin:
    """optimum-vim's loading / saving / card / push behaviour for a transformers ``PreTrainedModel`` subclass (list it
    first among the bases). Family-neutral: it reads the ``quant_method`` of the config, never the model type."""

    def __init__(self, config, *args, **kwargs):
        _refuse_unregistered_quantized_config(config)
        super().__init__(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``; a ``ViMQuantizationConfig`` passed for an already quantized checkpoint
        contributes its loading options (``dequantize``) to the checkpoint's own config instead of being ignored."""
        qc = kwargs.get("quantization_config")
        if _is_our_config(qc) and not qc.is_quantized_layout and pretrained_model_name_or_path is not None:
            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):
                hub = {k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs}
                config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **hub)
            saved = getattr(config, "quantization_config", None)
            saved = saved.to_dict() if _is_our_config(saved) else saved
            if isinstance(saved, dict) and saved.get("quant_method") == _quant_method() and saved.get("layers"):
                loading, default = qc.get_loading_attributes(), type(qc)().to_dict()
                ignored = sorted(k for k, v in qc.to_dict().items() if k not in loading and v != default.get(k, v))
                if ignored:
                    logger.warning("%s is already quantized: only the loading options %s of the passed "
                                   "ViMQuantizationConfig apply; %s are the checkpoint's", pretrained_model_name_or_path,
                                   sorted(loading), ignored)
                config = copy.deepcopy(config)
                config.quantization_config = {**saved, **loading}  # transformers reads the saved config as a dict
                kwargs = {**kwargs, "config": config}
                kwargs.pop("quantization_config")
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, model_card: bool = True, **kwargs):
        """``PreTrainedModel.save_pretrained``, written atomically (a temporary folder moved into place), with
        byte-reproducible safetensors headers, plus a README.md model card and the loading hints of
        :mod:`optimum_vim.hub` (``model_card=False`` skips both). A quantized model's config records the specs of the
        quantized modules under this model's own names.

        ``push_to_hub=True`` then publishes the folder with :meth:`push_to_hub` (``repo_id`` or the folder name),
        forwarding transformers' push arguments (``commit_message``, ``commit_description``, ``private``, ``token``,
        ``revision``, ``create_pr``, ``tags``).
        """
        from .serialization import atomic_save, canonicalize_safetensors_headers

        repo_id = kwargs.pop("repo_id", None)
        push_args = {k: kwargs.pop(k) for k in _PUSH_KWARGS if k in kwargs}
        is_main = kwargs.get("is_main_process", True)
        card_name = repo_id or os.path.basename(os.path.abspath(save_directory))

        def _save(tmp):
            with _config_of_this_model(self):
                super(QuantizableModelMixin, self).save_pretrained(tmp, *args, **kwargs)
            canonicalize_safetensors_headers(tmp)
            if model_card and is_main:
                from .hub import push  # looked up at call time: the hub package is not imported with the model

                push.write_loading_hints(tmp)
                push.write_model_card(self, tmp, repo_id=card_name)

        atomic_save(_save, save_directory)
        if push_to_hub and is_main:
            self.push_to_hub(card_name, token=kwargs.get("token"), max_shard_size=kwargs.get("max_shard_size", "50GB"),
                             **push_args)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                    create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                    processor=None) -> str:
        """transformers' ``push_to_hub`` (same arguments), publishing weights, config, the image processor
        (``processor=``) and the rendered model card in one commit (:func:`optimum_vim.hub.push_model_to_hub`). An
        existing card on the Hub is merged, not replaced: its metadata and user-written or user-edited sections stay
        (``optimum_vim.hub.merge_card``). Returns the commit URL."""
        from .hub.push import push_model_to_hub

        return push_model_to_hub(self, repo_id, processor=processor, commit_message=commit_message,
                                 commit_description=commit_description, private=private, token=token,
                                 revision=revision, create_pr=create_pr, max_shard_size=max_shard_size, tags=tags)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters as transformers counts them for its own quantizers: a quantized layer counts the weights it
        stands for (``out_features x in_features`` codes, bias), not the bytes of its packed buffers; so a quantized
        model reports the float model's count. Quantized weights are frozen (``only_trainable`` leaves them out)."""
        total = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if only_trainable:
            return total
        for module in self.modules():
            count = getattr(module, "num_weight_parameters", None)
            if count is not None:
                total += count()
        return total

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """transformers' footprint (parameters and buffers, i.e. a quantized layer's packed codes, scales and
        codebooks) plus what the CPU kernels keep cached for this model's quantized weights
        (:func:`optimum_vim.size.memory_footprint`)."""
        from .size import memory_footprint

        return memory_footprint(self, return_buffers)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """transformers' weight loading, after refusing a quantized optimum-vim checkpoint that is about to load as a
        float model (its ``quantization_config`` was removed from config.json or names another method)."""
        from .serialization import refuse_quantized_checkpoint_as_float

        quantizer = getattr(load_config, "hf_quantizer", None)
        active = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
        declared = getattr(model.config, "quantization_config", None)
        declared = declared.get("quant_method") if isinstance(declared, dict) else getattr(declared, "quant_method", None)
        refuse_quantized_checkpoint_as_float(checkpoint_files, _method_name(active), _method_name(declared))
        # the next _load_pretrained_model after this mixin in the model class's MRO (transformers' own)
        return super(QuantizableModelMixin, type(model))._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, *args, **kwargs)


@contextlib.contextmanager
def _config_of_this_model(model):
    """While saving: the quantization config's ``layers`` are the specs of ``model``'s quantized modules under its
    own names (a backbone taken from a quantized classifier shares the classifier's config, whose names carry the
    classifier's prefix)."""
    qc = getattr(model.config, "quantization_config", None)
    layers = getattr(qc, "layers", None)
    if not layers:
        yield
        return
    from .modules import QModule

    own = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QModule) and not any(name.startswith(p + ".") for p in own):
            own[name] = mod.spec.to_dict()
    if set(own) == set(layers):
        yield
        return
    fixed = copy.deepcopy(qc)
    fixed.layers = own
    model.config.quantization_config = fixed
    try:
        yield
    finally:
        model.config.quantization_config = qc


def family_name(config) -> str:
    """The family's name for messages: its config class's name without ``Config`` (``VimConfig`` -> ``"Vim"``);
    ``config`` is a config or a config class."""
    cls = config if isinstance(config, type) else type(config)
    return cls.__name__.removesuffix("Config") or str(getattr(config, "model_type", "model"))


def _quant_method() -> str:
    from .quantization_config import QUANT_METHOD

    return QUANT_METHOD


def _is_our_config(qc) -> bool:
    """Whether ``qc`` is a ViMQuantizationConfig (duck-typed: transformers may hand over its own copy)."""
    return getattr(qc, "quant_method", None) == _quant_method() and hasattr(qc, "is_quantized_layout")


def _method_name(method) -> str | None:
    return None if method is None else str(getattr(method, "value", method))


def _refuse_unregistered_quantized_config(config) -> None:
    """A quantized checkpoint reaches the model with its quantization config still a dict only when the optimum-vim
    quantizer is not registered; transformers would then load packed integers as float weights (garbage logits)."""
    qc = getattr(config, "quantization_config", None)
    method = _quant_method()
    if isinstance(qc, dict) and qc.get("quant_method") == method:
        raise RuntimeError(
            f"this {family_name(config)} checkpoint is quantized with optimum-vim, but the "
            f"{method!r} quantizer is not registered with transformers, so it would load as a broken float model. Run "
            "`import optimum_vim` (which registers it) before from_pretrained, or pass "
            "quantization_config=ViMQuantizationConfig.from_dict(...)"
        )


__all__ = ["QuantizableModelMixin", "family_name"]
