"""The builtin structured log: every cluster event as one JSON line in <data-dir>/logs/skulk.jsonl,
rotated at telemetry.log_max_bytes."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from skulk_core.config import ConfigLoader
from skulk_core.node import build_node
from skulk_core.testing import start_node_in_thread


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_node_lifecycle_events(tmp_path: Path):
    log = tmp_path / "logs" / "skulk.jsonl"
    with ExitStack() as stack:
        node = start_node_in_thread(stack, tmp_path)
        assert "node.started" in [e["kind"] for e in read_events(log)]  # written before the node is ready
    events = read_events(log)
    kinds = [e["kind"] for e in events]
    # other services may log their own events in between; these three come in this order
    assert kinds.index("node.started") < kinds.index("node.stopping") < kinds.index("node.stopped") == len(kinds) - 1
    assert all(e["node_id"] == node.node_id for e in events)
    started = events[kinds.index("node.started")]
    assert started["api"] == node.api_url and started["name"] == node.name
    assert started["plugins"] == node.plugins.names()
    assert started["ts"].endswith("+00:00")


def _node(tmp_path: Path, **telemetry):
    loader = ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}, "telemetry": telemetry})
    return build_node(loader, autoload=False)


def test_events_before_the_data_dir_is_known_are_kept(tmp_path: Path):
    node = _node(tmp_path)
    node.emit("early.event", n=1)  # the plugin learns its path when services are registered
    log = tmp_path / "logs" / "skulk.jsonl"
    assert not log.exists()
    node.plugins.services(node)
    node.emit("later.event", values=("x", "y"), path=tmp_path)
    events = read_events(log)
    assert [e["kind"] for e in events] == ["early.event", "later.event"]
    assert events[0]["n"] == 1
    assert events[1]["values"] == ["x", "y"] and events[1]["path"] == str(tmp_path)  # tuples and paths serialise


def test_rotation_at_the_size_limit(tmp_path: Path):
    node = _node(tmp_path, log_max_bytes="1000", log_backups=2)
    node.plugins.services(node)
    for i in range(40):
        node.emit("test.tick", i=i, padding="x" * 40)
    logs = tmp_path / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["skulk.jsonl", "skulk.jsonl.1", "skulk.jsonl.2"]
    newest, older, oldest = (read_events(logs / name) for name in ("skulk.jsonl", "skulk.jsonl.1", "skulk.jsonl.2"))
    for name in ("skulk.jsonl", "skulk.jsonl.1", "skulk.jsonl.2"):
        assert (logs / name).stat().st_size <= 1000
    ticks = [e["i"] for e in oldest + older + newest]
    assert ticks == list(range(ticks[0], 40))  # nothing lost between the kept files, newest last
    assert ticks[0] > 0  # the oldest lines were rotated away


def test_no_backups_truncates(tmp_path: Path):
    node = _node(tmp_path, log_max_bytes="300", log_backups=0)
    node.plugins.services(node)
    for i in range(20):
        node.emit("test.tick", i=i)
    logs = tmp_path / "logs"
    assert [p.name for p in logs.iterdir()] == ["skulk.jsonl"]
    assert (logs / "skulk.jsonl").stat().st_size <= 300
    assert read_events(logs / "skulk.jsonl")[-1]["i"] == 19


def test_blocking_jsonlog_writes_nothing(tmp_path: Path):
    node = build_node(ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}}), blocked=["jsonlog"], autoload=False)
    assert "jsonlog" not in node.plugins.names()
    node.plugins.services(node)
    node.emit("test.tick")
    assert not (tmp_path / "logs").exists()
