"""Model cards, atomic saving and Hub publishing."""

from .cards import merge_card, plot_accuracy_vs_bits, render_model_card
from .push import (
    atomic_save,
    load_benchmark_table,
    merge_with_remote_card,
    push_model_to_hub,
    save_for_hub,
    set_card_info,
    write_loading_hints,
    write_model_card,
)


def _write_card_hook(model, folder, repo_id):
    from . import push  # looked up at call time (tests replace push.write_model_card)

    push.write_loading_hints(folder)
    return push.write_model_card(model, folder, repo_id=repo_id)


def _merge_card_hook(api, repo_id, folder, revision):
    from . import push

    return push.merge_with_remote_card(api, repo_id, folder, revision)


def _register() -> None:
    from ..models.vim import modeling_vim

    modeling_vim.register_model_card_writer(_write_card_hook, merge=_merge_card_hook)


_register()

__all__ = [
    "atomic_save",
    "load_benchmark_table",
    "merge_card",
    "merge_with_remote_card",
    "plot_accuracy_vs_bits",
    "push_model_to_hub",
    "render_model_card",
    "save_for_hub",
    "set_card_info",
    "write_loading_hints",
    "write_model_card",
]
