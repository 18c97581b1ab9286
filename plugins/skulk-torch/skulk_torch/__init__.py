"""Skulk's PyTorch backend: a layer range of a llama-family model, so a model can be split over nodes.

Importing this package is cheap; torch is imported when a stage is loaded.
"""

import os

# Torch's CPU allocator backs every allocation of 2 MiB or more with transparent huge pages when
# this is set, which it reads once, at its first allocation: so here, before anything of this
# package imports torch. A decode step streams the stage's weights once, and with 4 KiB pages it
# also walks their page tables: on the project's 2-core VM (THP in ``madvise`` mode) every
# placement of the default model ran 2-3 % faster a token. A value the environment sets is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from skulk_torch.backend import RUNTIME_OVERHEAD_BYTES, TorchBackend  # noqa: E402
from skulk_torch.settings import TorchSettings  # noqa: E402

__version__ = "0.1.0"

__all__ = ["RUNTIME_OVERHEAD_BYTES", "TorchBackend", "TorchSettings", "__version__"]
