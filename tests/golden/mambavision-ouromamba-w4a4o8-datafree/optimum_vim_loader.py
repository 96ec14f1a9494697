"""Loader of this optimum-vim checkpoint for `trust_remote_code=True` (config.json's auto_map points here).

The model type "mambavision" and its quantizer come from the optimum-vim package: `pip install optimum-vim`. With it installed,
the usual way needs no remote code: `import optimum_vim`, then `from_pretrained` this folder or repo.
"""

import optimum_vim  # noqa: F401 - registers the MambaVision model type, image processor and quantizer with transformers
from optimum_vim.models.mambavision import MambaVisionConfig, MambaVisionForImageClassification, MambaVisionImageProcessor, MambaVisionModel  # noqa: F401
