"""Calibration utilities: data adapters, activation observers, tensor builders."""

from .data import CalibrationDataError, describe_source, prepare_calibration_batches
from .observers import ActivationStats, collect_activation_stats

__all__ = [
    "ActivationStats",
    "CalibrationDataError",
    "collect_activation_stats",
    "describe_source",
    "prepare_calibration_batches",
]
