"""Skulk's entry point for the torch backend (group ``skulk``, name ``torch``)."""

from __future__ import annotations

from skulk_core import BackendRegistry, ConfigSectionRegistry, hookimpl

from skulk_torch.backend import TorchBackend
from skulk_torch.settings import TorchSettings


@hookimpl
def skulk_register_backends(registry: BackendRegistry) -> None:
    registry.add("torch", TorchBackend)


@hookimpl
def skulk_config_sections(registry: ConfigSectionRegistry) -> None:
    registry.add("torch", TorchSettings)
