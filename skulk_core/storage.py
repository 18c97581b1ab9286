"""Storage values: how a model card becomes files on this node's disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from attrs import frozen

from skulk_core.model import ModelFiles

# progress(bytes_done, bytes_total or None)
Progress = Callable[[int, "int | None"], None]


@runtime_checkable
class ModelResolver(Protocol):
    """Returned by a storage plugin that can provide a model's files on this node."""

    source: str  # shown to users: "local", "store", "huggingface"

    async def fetch(self, progress: Progress | None = None) -> ModelFiles:
        """Make the files present (downloading or staging if needed) and return them.

        Must never leave a partial file under a final name: write to a temporary name and rename.
        """


@frozen
class LocalModel:
    """A model whose files are on this node, as storage plugins report it."""

    model_id: str
    path: Path
    bytes_on_disk: int
    store: str  # which plugin holds it


@frozen
class ReadyFiles:
    """A resolver for files already on disk: fetching is a no-op."""

    files: ModelFiles
    source: str = "local"

    async def fetch(self, progress: Progress | None = None) -> ModelFiles:
        return self.files
