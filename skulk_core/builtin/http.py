"""Builtin frontend plugin: the node's own routes (``/health``, ``/node_id``, ``/node``, ``/state``)."""

from __future__ import annotations

import time

from skulk_core.hookspecs import hookimpl
from skulk_core.http import HttpRequest, HttpResponse


@hookimpl
def skulk_register_http(registry, node) -> None:  # type: ignore[no-untyped-def]
    async def health(request: HttpRequest) -> HttpResponse:
        models = {m.id: m.status for m in node.models.models()}
        return HttpResponse(200, {"status": "ok", "node_id": node.node_id, "models": models})

    async def node_id(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, node.node_id)

    async def node_info(request: HttpRequest) -> HttpResponse:
        from skulk_core import __version__

        return HttpResponse(
            200,
            {
                "node_id": node.node_id,
                "name": node.name,
                "version": __version__,
                "uptime_s": None if node.started_at is None else round(time.time() - node.started_at, 3),
                "plugins": [
                    {"name": p.name, "source": p.source, "distribution": p.distribution, "version": p.version}
                    for p in node.plugins.describe()
                ],
            },
        )

    async def state(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, node.cluster.describe())

    registry.route("GET", "/state", state)
    registry.route("GET", "/health", health)
    registry.route("GET", "/node_id", node_id)
    registry.route("GET", "/node", node_info)
