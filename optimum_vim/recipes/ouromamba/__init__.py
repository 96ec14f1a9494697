"""OuroMamba (Ramachandran et al., ICCV 2025): data-free PTQ for Vision Mamba.

``generation``: OuroMamba-Gen, synthetic calibration images from Gaussian noise.
"""

from .generation import GenerationDivergedError, generate_calibration_images, generation_loss

__all__ = ["GenerationDivergedError", "generate_calibration_images", "generation_loss"]
