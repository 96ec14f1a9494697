"""Model cards, atomic saving and Hub publishing."""

from .cards import plot_accuracy_vs_bits, render_model_card
from .push import atomic_save, load_benchmark_table, push_model_to_hub, save_for_hub, set_card_info, write_model_card

__all__ = [
    "atomic_save",
    "load_benchmark_table",
    "plot_accuracy_vs_bits",
    "push_model_to_hub",
    "render_model_card",
    "save_for_hub",
    "set_card_info",
    "write_model_card",
]
