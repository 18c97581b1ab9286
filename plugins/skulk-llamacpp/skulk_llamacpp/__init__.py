"""Skulk's llama.cpp backend: whole GGUF models on the CPU, many sequences per decode step.

Importing this package is cheap; ``llama_cpp`` is imported when a model is loaded.
"""

from skulk_llamacpp.backend import RUNTIME_OVERHEAD_BYTES, LlamaCppBackend
from skulk_llamacpp.settings import LlamaCppSettings

__version__ = "0.1.0"

__all__ = ["LlamaCppBackend", "LlamaCppSettings", "RUNTIME_OVERHEAD_BYTES", "__version__"]
