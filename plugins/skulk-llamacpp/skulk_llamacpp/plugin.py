"""Skulk's entry point for the llama.cpp backend (group ``skulk``, name ``llamacpp``)."""

from __future__ import annotations

from skulk_core import BackendRegistry, ConfigSectionRegistry, hookimpl

from skulk_llamacpp.backend import LlamaCppBackend
from skulk_llamacpp.settings import LlamaCppSettings


@hookimpl
def skulk_register_backends(registry: BackendRegistry) -> None:
    registry.add("llamacpp", LlamaCppBackend)


@hookimpl
def skulk_config_sections(registry: ConfigSectionRegistry) -> None:
    registry.add("llamacpp", LlamaCppSettings)
