"""Helpers shared by the OpenAI frontend's tests: starting nodes and waiting on their models."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from skulk_core.node import Node
from skulk_core.testing import start_node_in_thread

HERE = Path(__file__).resolve().parent
FAKE_BACKEND = HERE / "openai_fake_backend.py"
FAKE_MODEL_ID = "fake-tiny"


def wait_until_ready(node: Node, model_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    status = "not registered"
    while time.monotonic() < deadline:
        try:
            served = node.models.get(model_id)
        except Exception:
            pass
        else:
            status = served.status
            if status == "ready":
                return
            if status == "failed":
                raise RuntimeError(f"{model_id} failed to load: {served.error}")
        time.sleep(0.02)
    raise TimeoutError(f"{model_id} not ready after {timeout} s (status: {status})")


def wait_for_idle(node: Node, model_id: str, timeout: float = 1.5) -> float:
    """Seconds until the model's runner holds no sequence; fails after ``timeout``."""
    runner = node.models.get(model_id).runner
    assert runner is not None
    started = time.monotonic()
    while runner.load != (0, 0):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"the runner still holds {runner.load} (active, waiting) after {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - started


def start_fake_node(stack: ExitStack, data_dir: Path, model: Path, *, fake: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Node:
    """A node in this process serving the fake model (``fake``: the fake backend's settings)."""
    return start_node_in_thread(
        stack,
        data_dir,
        plugins=[str(FAKE_BACKEND), "openai"],
        sections={
            "serve": {"enabled": True, "model": str(model), "backend": "fake", "max_sequences": 4},
            "fake": {"step_delay": 0.003, **(fake or {})},
            "cluster": {"discovery": False},
            **sections,
        },
    )
