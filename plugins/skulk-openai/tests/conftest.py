"""Fixtures for the OpenAI frontend's tests: an in-process node serving the fake model (fast,
protocol and error tests) and one serving the default model on llama.cpp (end to end).

Each node is started once per test module (loading a model is the slow part) and stopped after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from openai_testing import FAKE_MODEL_ID, start_fake_node, wait_until_ready

from skulk_core import DEFAULT_MODEL_ID
from skulk_core.node import Node
from skulk_core.testing import start_node_in_thread


@pytest.fixture(autouse=True)
def _clean_skulk_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SKULK_* variable of the developer's shell leaks into a test, and no test touches ~/.skulk."""
    for name in list(os.environ):
        if name.startswith("SKULK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SKULK_HOME", str(tmp_path / "skulk-home"))


@pytest.fixture(scope="session")
def fake_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openai_fake_backend import write_fake_gguf

    return write_fake_gguf(tmp_path_factory.mktemp("fake-model") / f"{FAKE_MODEL_ID}.gguf")


@pytest.fixture(scope="module")
def fake_node(tmp_path_factory: pytest.TempPathFactory, fake_model: Path) -> Iterator[Node]:
    with ExitStack() as stack:
        node = start_fake_node(stack, tmp_path_factory.mktemp("fake-node"), fake_model)
        wait_until_ready(node, FAKE_MODEL_ID)
        yield node


@pytest.fixture(scope="module")
def llama_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    pytest.importorskip("skulk_llamacpp", reason="the llama.cpp backend plugin (plugins/skulk-llamacpp) is not installed")
    with ExitStack() as stack:
        node = start_node_in_thread(
            stack,
            tmp_path_factory.mktemp("llama-node"),
            plugins=["llamacpp", "openai"],
            sections={
                "serve": {"enabled": True, "model": DEFAULT_MODEL_ID, "max_sequences": 8, "context_length": 2048, "threads": 1},
                "cluster": {"discovery": False},
            },
        )
        wait_until_ready(node, DEFAULT_MODEL_ID, timeout=120)
        yield node


@pytest.fixture
def http(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """A raw HTTP client on the module's node (``fake_node`` unless the module sets ``NODE``)."""
    node = request.getfixturevalue(getattr(request.module, "NODE", "fake_node"))
    with httpx.Client(base_url=node.api_url, timeout=30) as client:
        yield client
