"""Builtin storage plugin: the default model, and GGUF files already on this node's disk.

``skulk_find_model`` knows the default model's id and any path to a ``.gguf`` file (or a GGUF under
``<data-dir>/models``). ``skulk_model_resolver`` runs first in the chain: a card whose source is a
local path that exists needs no download.
"""

from __future__ import annotations

from pathlib import Path

from skulk_core.errors import ModelError
from skulk_core.hookspecs import hookimpl
from skulk_core.model import DEFAULT_MODEL_ID, ModelCard, ModelFiles, default_model_path
from skulk_core.storage import LocalModel, ReadyFiles

_cards: dict[tuple[str, int, str | None], ModelCard] = {}


def card_for_path(path: Path, model_id: str | None = None) -> ModelCard:
    """Read (and remember, by path and mtime) a GGUF file's card."""
    key = (str(path.resolve()), path.stat().st_mtime_ns, model_id)
    if key not in _cards:
        _cards[key] = ModelCard.from_gguf(path, model_id=model_id)
    return _cards[key]


def _models_dir(node) -> Path:  # type: ignore[no-untyped-def]
    return node.data_dir / "models"


@hookimpl(trylast=True)
def skulk_find_model(ref: str, node) -> ModelCard | None:  # type: ignore[no-untyped-def]
    if ref in (DEFAULT_MODEL_ID, "default"):
        return card_for_path(default_model_path(), DEFAULT_MODEL_ID)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise ModelError(f"no model file at {path}")
        return card_for_path(path)
    candidate = _models_dir(node) / f"{ref}.gguf"
    if candidate.is_file():
        return card_for_path(candidate, ref)
    return None


@hookimpl(tryfirst=True)
def skulk_model_resolver(card: ModelCard, node) -> ReadyFiles | None:  # type: ignore[no-untyped-def]
    if card.source.kind != "local" or card.source.path is None:
        return None
    path = Path(card.source.path)
    if not path.exists():
        return None
    return ReadyFiles(ModelFiles(model_id=card.id, format=card.format, primary=path, paths=(path,)))


@hookimpl
def skulk_local_models(node) -> list[LocalModel]:  # type: ignore[no-untyped-def]
    found = []
    try:
        path = default_model_path()
        found.append(LocalModel(DEFAULT_MODEL_ID, path, path.stat().st_size, "builtin"))
    except ModelError:
        pass
    models = _models_dir(node)
    if models.is_dir():
        for path in sorted(models.glob("*.gguf")):
            found.append(LocalModel(path.stem, path, path.stat().st_size, "builtin"))
    return found
