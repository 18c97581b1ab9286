"""Builtin telemetry plugin: every cluster event as one JSON line in ``<data-dir>/logs/skulk.jsonl``.

The file rotates at ``telemetry.log_max_bytes`` keeping ``telemetry.log_backups`` old files
(``skulk.jsonl.1`` is the newest of them). Each event opens, appends and closes the file, so a
crash never loses a buffered line and other processes may read it at any time. Events raised before
the node knows its data dir are held (at most a thousand) and written first.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

from skulk_core.config import parse_size
from skulk_core.hookspecs import hookimpl

LOG_NAME = "skulk.jsonl"


def _json_default(value: object) -> object:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class JsonLogPlugin:
    def __init__(self) -> None:
        self.path: Path | None = None
        self.max_bytes = 10 * 1024 * 1024
        self.backups = 5
        self._pending: list[str] = []
        self._lock = threading.Lock()  # events may come from worker threads

    @hookimpl
    def skulk_register_services(self, registry, node) -> None:  # type: ignore[no-untyped-def]
        # No service to run: this is where the plugin learns the node's data dir and limits.
        self.path = node.data_dir / "logs" / LOG_NAME
        self.max_bytes = parse_size(node.config.telemetry.log_max_bytes)
        self.backups = node.config.telemetry.log_backups

    @hookimpl
    def skulk_event(self, event) -> None:  # type: ignore[no-untyped-def]
        record = {
            "ts": dt.datetime.fromtimestamp(event.at, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "kind": event.kind,
            "node_id": event.node_id,
            **dict(event.attributes),
        }
        line = json.dumps(record, default=_json_default, separators=(",", ":")) + "\n"
        with self._lock:
            if self.path is None:
                if len(self._pending) < 1000:
                    self._pending.append(line)
                return
            lines, self._pending = [*self._pending, line], []
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for text in lines:
                self._rotate_if_needed(len(text.encode()))
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(text)

    def _rotate_if_needed(self, incoming: int) -> None:
        assert self.path is not None
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{LOG_NAME}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{LOG_NAME}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{LOG_NAME}.1"))


plugin = JsonLogPlugin
