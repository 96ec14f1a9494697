"""Model cards, atomic saving and Hub publishing (``push_model_to_hub`` is what every model's ``push_to_hub`` runs)."""

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
