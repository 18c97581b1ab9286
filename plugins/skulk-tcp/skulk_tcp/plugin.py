"""The hook implementations of skulk-tcp: the ``tcp`` transport and its ``tcp`` config section."""

from __future__ import annotations

from skulk_core import ConfigSectionRegistry, TransportRegistry, hookimpl

from skulk_tcp.settings import TcpSettings
from skulk_tcp.transport import TcpTransport


@hookimpl
def skulk_register_transports(registry: TransportRegistry) -> None:
    registry.add("tcp", TcpTransport)


@hookimpl
def skulk_config_sections(registry: ConfigSectionRegistry) -> None:
    registry.add("tcp", TcpSettings)
