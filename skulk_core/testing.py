"""Pytest fixtures for Skulk and its plugin authors (registered through the ``pytest11`` entry point).

- ``free_port``: a TCP port free on loopback right now.
- ``skulk_plugins``: a fresh plugin set with autoload off (builtins only), for calling hooks.
- ``make_skulk_node``: start a real node in-process (own event loop in a thread) on loopback, with
  the plugins you name; every node it starts is stopped at teardown.
- ``skulk_node``: one such node with only the builtin plugins.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from skulk_core.config import ConfigLoader
from skulk_core.node import Node, build_node
from skulk_core.plugins import PluginSelection, Plugins, make_plugin_manager


def find_free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_node_in_thread(
    stack: ExitStack,
    data_dir: Path,
    *,
    plugins: Sequence[str] = (),
    sections: dict[str, dict[str, Any]] | None = None,
    document: dict[str, Any] | None = None,
) -> Node:
    """Start a node on loopback in a worker thread's event loop; ``stack`` stops it."""
    from anyio.from_thread import start_blocking_portal

    cli: dict[str, dict[str, Any]] = {
        "node": {"data_dir": str(data_dir)},
        "api": {"host": "127.0.0.1", "port": 0},
        "transport": {"host": "127.0.0.1", "port": 0},
        "serve": {"enabled": False},
    }
    for name, values in (sections or {}).items():
        cli.setdefault(name, {}).update(values)
    loader = ConfigLoader(document=document or {}, env={}, cli=cli)
    node = build_node(loader, plugins=plugins, autoload=False)
    portal = stack.enter_context(start_blocking_portal())
    future, _ = portal.start_task(node.run, name=f"skulk node {node.node_id}")
    stack.callback(future.cancel)
    return node


@pytest.fixture
def free_port() -> int:
    return find_free_port()


@pytest.fixture
def skulk_plugins() -> Plugins:
    return make_plugin_manager(PluginSelection(autoload=False))


@pytest.fixture
def make_skulk_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Node]]:
    with ExitStack() as stack:

        def make(plugins: Sequence[str] = (), sections: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> Node:
            data_dir = tmp_path_factory.mktemp("skulk-node")
            return start_node_in_thread(stack, data_dir, plugins=plugins, sections=sections, **kwargs)

        yield make


@pytest.fixture
def skulk_node(make_skulk_node: Callable[..., Node]) -> Node:
    return make_skulk_node()
