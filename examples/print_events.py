"""print_events: a third-party Skulk telemetry plugin in one file. It prints every cluster event.

Run a node with it:

    skulk run --plugin examples/print_events.py

``--plugin`` with a path to a ``.py`` file loads the file as a plugin named after it
(``print_events``); ``skulk plugins --plugin examples/print_events.py`` lists it with the hook it
implements. To ship it as a package instead, declare an entry point in the group ``skulk``:

    [project.entry-points.skulk]
    print-events = "print_events"

A plugin imports only ``skulk_core``'s public API. Telemetry hooks are called for every event on the
caller's thread, so they must be quick: this one prints a line and returns.
"""

from __future__ import annotations

import json
import time

from skulk_core import ClusterEvent, hookimpl


@hookimpl
def skulk_event(event: ClusterEvent) -> None:
    when = time.strftime("%H:%M:%S", time.localtime(event.at))
    details = " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in event.attributes.items())
    print(f"[event] {when} {event.kind} node={event.node_id} {details}".rstrip(), flush=True)
