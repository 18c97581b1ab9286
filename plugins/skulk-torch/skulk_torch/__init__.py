"""Skulk's PyTorch backend: a layer range of a llama-family model, so a model can be split over nodes.

Importing this package is cheap; torch is imported when a stage is loaded.
"""

from skulk_torch.backend import RUNTIME_OVERHEAD_BYTES, TorchBackend
from skulk_torch.settings import TorchSettings

__version__ = "0.1.0"

__all__ = ["RUNTIME_OVERHEAD_BYTES", "TorchBackend", "TorchSettings", "__version__"]
