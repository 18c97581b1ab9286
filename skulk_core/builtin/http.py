"""Builtin frontend plugin: the node's own routes.

``/health``, ``/node_id``, ``/node``, ``/state``, and the instance API: ``GET /instance/previews``,
``POST /place_instance``, ``GET /instance/{instance_id}``, ``DELETE /instance/{instance_id}``.
"""

from __future__ import annotations

import time

from skulk_core.errors import ModelError, PlacementError, RequestError, SkulkError, TransportError
from skulk_core.hookspecs import hookimpl
from skulk_core.http import HttpRequest, HttpResponse, error_body
from skulk_core.placement import PlacementRequest


def _placement_json(placement) -> dict:  # type: ignore[no-untyped-def]
    return {
        "instance_id": placement.instance_id,
        "model": placement.model_id,
        "stages": [
            {"node_id": s.node_id, "layers": [s.shard.start, s.shard.end], "backend": s.backend} for s in placement.stages
        ],
    }


def _error(exc: Exception) -> HttpResponse:
    if isinstance(exc, (ModelError, RequestError)):
        code = getattr(exc, "code", None) or ("model_not_found" if isinstance(exc, ModelError) else None)
        return HttpResponse(404 if isinstance(exc, ModelError) else 400, error_body(str(exc), code=code))
    if isinstance(exc, PlacementError):
        return HttpResponse(409, error_body(str(exc), code="placement_failed"))
    if isinstance(exc, TransportError):
        return HttpResponse(503, error_body(str(exc), type_="server_error", code="cluster_unavailable"))
    return HttpResponse(400, error_body(str(exc)))


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

    async def previews(request: HttpRequest) -> HttpResponse:
        ref = request.query.get("model")
        if not ref:
            return HttpResponse(400, error_body("give the model to preview: /instance/previews?model=ID", param="model"))
        try:
            card = node.plugins.find_model(ref, node)
            if card is None:
                raise ModelError(f"no plugin knows the model {ref!r}")
            context = min(card.context_length, node.config.serve.context_length or 4096)
            wanted = PlacementRequest(card.id, backend=request.query.get("backend"), context_length=context, max_sequences=node.config.serve.max_sequences)
            found = node.plugins.placement_previews(card, node.cluster.node_views(), wanted, node.config.extra)
        except SkulkError as exc:
            return _error(exc)
        return HttpResponse(
            200,
            {
                "model": card.id,
                "previews": [
                    {"nodes": len(p.placement.stages) if p.placement else None, "placement": _placement_json(p.placement) if p.placement else None, "error": p.reason}
                    for p in found
                ],
            },
        )

    async def place(request: HttpRequest) -> HttpResponse:
        body = request.json()
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return HttpResponse(400, error_body('the body must be a JSON object with "model": a model id or path', param="model"))
        min_nodes = body.get("min_nodes", 1)
        backend = body.get("backend")
        if not isinstance(min_nodes, int) or isinstance(min_nodes, bool) or min_nodes < 1:
            return HttpResponse(400, error_body("min_nodes must be an integer of at least 1", param="min_nodes"))
        if backend is not None and not isinstance(backend, str):
            return HttpResponse(400, error_body("backend must be a string", param="backend"))
        try:
            instance_id = await node.instances.place(
                body["model"],
                backend=backend,
                min_nodes=min_nodes,
                context_length=node.config.serve.context_length,
                max_sequences=node.config.serve.max_sequences,
            )
        except SkulkError as exc:
            return _error(exc)
        return HttpResponse(200, {"instance_id": instance_id, **_instance(instance_id)})

    def _instance(instance_id: str) -> dict:
        for item in node.cluster.describe()["instances"]:
            if item["instance_id"] == instance_id:
                return item
        return {}

    async def get_instance(request: HttpRequest) -> HttpResponse:
        found = _instance(request.path_params["instance_id"])
        if not found:
            return HttpResponse(404, error_body(f"no instance {request.path_params['instance_id']!r}", code="instance_not_found"))
        return HttpResponse(200, found)

    async def delete_instance(request: HttpRequest) -> HttpResponse:
        instance_id = request.path_params["instance_id"]
        try:
            await node.instances.delete(instance_id)
        except RequestError as exc:
            return HttpResponse(404, error_body(str(exc), code="instance_not_found"))
        except SkulkError as exc:
            return _error(exc)
        return HttpResponse(200, {"instance_id": instance_id, "deleted": True})

    registry.route("GET", "/health", health)
    registry.route("GET", "/node_id", node_id)
    registry.route("GET", "/node", node_info)
    registry.route("GET", "/state", state)
    registry.route("GET", "/instance/previews", previews)
    registry.route("POST", "/place_instance", place)
    registry.route("GET", "/instance/{instance_id}", get_instance)
    registry.route("DELETE", "/instance/{instance_id}", delete_instance)
