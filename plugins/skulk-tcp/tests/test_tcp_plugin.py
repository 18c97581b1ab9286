"""The plugin as the core sees it: the entry point, the ``tcp`` config section, the contract."""

from __future__ import annotations

import anyio
import pytest

import skulk_core
from skulk_core import ByteStream, ConfigError, ConfigLoader, Connection, NodeIdentity, Transport, TransportContext
from skulk_core.identity import node_id_for
from skulk_core.plugins import PluginSelection, make_plugin_manager
from skulk_tcp import TcpSettings, TcpTransport


def test_the_core_is_this_repositorys_not_pypis_namesake() -> None:
    assert skulk_core.__version__.startswith("0.1."), "skulk_core must come from this repository, not PyPI's `skulk`"


def test_the_entry_point_registers_the_transport_and_its_section() -> None:
    plugins = make_plugin_manager(PluginSelection(autoload=False, plugins=("tcp",)))
    transports = plugins.transports()
    assert transports.entry("tcp").plugin == "tcp"
    assert transports.get("tcp") is TcpTransport
    assert plugins.config_sections().get("tcp") is TcpSettings


def test_the_tcp_section_is_read_from_the_file_and_the_environment(tmp_path) -> None:
    config_file = tmp_path / "skulk.yaml"
    config_file.write_text(
        "tcp:\n  tls_cert: /etc/skulk/node.pem\n  tls_key: /etc/skulk/node.key\n  max_frame_bytes: 32MiB\n"
        "  discovery_address: 192.168.1.255\n"
    )
    loader = ConfigLoader.from_file(config_file, env={"SKULK_TCP_HANDSHAKE_TIMEOUT": "2.5", "SKULK_TCP_MAX_PENDING_STREAMS": "9"})
    settings = loader.resolve({"tcp": TcpSettings}).section("tcp")
    assert isinstance(settings, TcpSettings) and settings.tls
    assert settings.max_frame == 32 * 1024 * 1024 and settings.handshake_timeout == 2.5
    assert settings.max_pending_streams == 9 and settings.discovery_address == "192.168.1.255"
    defaults = ConfigLoader(env={}).resolve({"tcp": TcpSettings})
    assert defaults.section("tcp") == TcpSettings() and not TcpSettings().tls


@pytest.mark.parametrize(
    ("yaml", "words"),
    [
        ("tcp:\n  tls_cert: a.pem\n", "together"),
        ("tcp:\n  max_frame_bytes: lots\n", "max_frame_bytes"),
        ("tcp:\n  stream_window_bytes: 1KiB\n", "stream_window_bytes"),
        ("tcp:\n  handshake_timeout: 0\n", "handshake_timeout"),
        ("tcp:\n  no_such_key: 1\n", "no_such_key"),
    ],
)
def test_a_bad_tcp_section_stops_start_up_naming_the_key(tmp_path, yaml, words) -> None:
    config_file = tmp_path / "skulk.yaml"
    config_file.write_text(yaml)
    with pytest.raises(ConfigError, match=words):
        ConfigLoader.from_file(config_file, env={}).resolve({"tcp": TcpSettings})


def test_the_transport_fits_the_contract(tmp_path) -> None:
    identity = NodeIdentity.load_or_create(tmp_path)
    assert identity.node_id == node_id_for(identity.public_key)  # what the handshake checks peers against
    transport = TcpTransport(TransportContext(identity=identity, cluster_secret=b"k", host="127.0.0.1", port=0))
    assert isinstance(transport, Transport) and transport.name == "tcp"
    assert transport.settings == TcpSettings() and transport.address is None and transport.on_rejected is None


@pytest.mark.anyio
async def test_connections_and_streams_fit_the_contract(make_transport, running) -> None:
    a, b = make_transport(), make_transport()
    async with running(a) as served, running(b):
        with anyio.fail_after(5):
            connection = await b.dial(served.address)
            stream = await connection.open_stream()
            assert isinstance(connection, Connection) and isinstance(stream, ByteStream)
            assert isinstance(connection.peer_id, str)
