"""The node runtime: one anyio task group per node that owns every long-running service.

Services signal readiness with ``task_status.started()``; shutdown cancels the group, and clean-up
runs shielded. ``build_node`` turns a config loader and a plugin selection into a ready-to-run
:class:`Node`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from attrs import evolve

from skulk_core.config import Config, ConfigLoader
from skulk_core.errors import ConfigError, PluginError, SkulkError
from skulk_core.http import Dispatcher, bind_socket, serve_http
from skulk_core.identity import NodeIdentity
from skulk_core.plugins import PluginSelection, Plugins, make_plugin_manager
from skulk_core.telemetry import ClusterEvent

log = logging.getLogger("skulk.node")


class Node:
    """One Skulk node: its config, identity, plugins and, while running, its services."""

    def __init__(self, config: Config, plugins: Plugins, identity: NodeIdentity) -> None:
        self.config = config
        self.plugins = plugins
        self.identity = identity
        self.started_at: float | None = None
        self.api_address: tuple[str, int] | None = None
        self.services: dict[str, Any] = {}  # name -> whatever the service exposes to others
        self._task_group: anyio.abc.TaskGroup | None = None
        from skulk_core.cluster.service import Cluster
        from skulk_core.inference import ModelServer
        from skulk_core.instances import Instances

        self.cluster = Cluster(self)
        self.instances = Instances(self)
        self.models = ModelServer(self)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def name(self) -> str:
        return self.config.node.name or socket.gethostname()

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def api_url(self) -> str:
        if self.api_address is None:
            raise RuntimeError("the node's HTTP service is not running")
        host, port = self.api_address
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        return f"http://{host}:{port}"

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The node's task group, for work that must live as long as the node."""
        if self._task_group is None:
            raise RuntimeError("the node is not running")
        return self._task_group

    def emit(self, kind: str, **attributes: object) -> ClusterEvent:
        event = ClusterEvent(kind=kind, node_id=self.node_id, attributes=attributes)
        self.plugins.event(event)
        return event

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Start every service, report ready, and run until cancelled."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = bind_socket(self.config.api.host, self.config.api.port)
        self.api_address = sock.getsockname()[:2]
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                http = self.plugins.http(self)
                await tg.start(serve_http, Dispatcher(http, self.config.api.key), sock)
                for entry in self.plugins.services(self):
                    try:
                        await tg.start(entry.value, self)
                    except SkulkError:
                        raise
                    except Exception as exc:
                        raise PluginError(entry.plugin, f"service {entry.name!r} failed to start: {exc!r}") from exc
                await tg.start(self.instances.run)
                await tg.start(self.cluster.run)
                await tg.start(self.models.serve_configured)
                self.started_at = time.time()
                self.emit("node.started", name=self.name, api=self.api_url, plugins=self.plugins.names())
                task_status.started(self)
                try:
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        self.emit("node.stopping")
        finally:
            self._task_group = None
            sock.close()
            self.emit("node.stopped")


def build_node(
    loader: ConfigLoader,
    *,
    plugins: Sequence[str] = (),
    blocked: Sequence[str] = (),
    autoload: bool | None = None,
    peers: Sequence[str] = (),
) -> Node:
    """Resolve the config, load plugins in the documented order and create the node identity.

    ``plugins`` and ``blocked`` (from ``--plugin`` / ``--no-plugin``) add to the config's
    ``plugins.load`` / ``plugins.block``; ``autoload`` (``--no-autoload``) overrides it.
    """
    core = loader.resolve(strict=False)
    selection = PluginSelection.from_environment(
        plugins=(*core.plugins.load, *plugins),
        blocked=(*core.plugins.block, *blocked),
        autoload=core.plugins.autoload if autoload is None else autoload,
    )
    plugin_set = make_plugin_manager(selection)
    identity = NodeIdentity.load_or_create(core.data_dir)
    sections = {entry.name: entry.value for entry in plugin_set.config_sections()}
    config = loader.resolve(sections, node_id=identity.node_id, strict=True)
    if peers:
        config = evolve(config, cluster=evolve(config.cluster, peers=(*config.cluster.peers, *peers)))
    if config.data_dir != core.data_dir:
        raise ConfigError(
            f"{config.source}: node_overrides for node id {identity.node_id} change node.data_dir; "
            "the data dir holds the node id, so override it by host name instead"
        )
    return Node(config, plugin_set, identity)
