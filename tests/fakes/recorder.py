"""A plugin that implements every hook and records each call in ``CALLS`` (hook name, arguments).

Load it with ``--plugin tests/fakes/recorder.py``; ``plugins.pm.get_plugin("recorder").CALLS``.
It returns recognisable values so a test can see them come back through the facade.
"""

from __future__ import annotations

import attrs

from skulk_core import LocalModel, ModelFiles, ReadyFiles, hookimpl

CALLS: list[tuple[str, dict]] = []


def _record(name: str, **kwargs: object) -> None:
    CALLS.append((name, kwargs))


@attrs.frozen
class RecorderSection:
    greeting: str = "hello"


@hookimpl
def skulk_register_transports(registry):  # type: ignore[no-untyped-def]
    _record("skulk_register_transports", registry=registry)
    registry.add("recorder-transport", lambda context: None)


@hookimpl(tryfirst=True)
def skulk_place(card, nodes, request, backends):  # type: ignore[no-untyped-def]
    _record("skulk_place", card=card, nodes=nodes, request=request, backends=backends)
    return None  # defer to the next placement


@hookimpl
def skulk_placement_previews(card, nodes, request, backends):  # type: ignore[no-untyped-def]
    _record("skulk_placement_previews", card=card, nodes=nodes, request=request, backends=backends)
    return []


@hookimpl
def skulk_register_backends(registry):  # type: ignore[no-untyped-def]
    _record("skulk_register_backends", registry=registry)


@hookimpl(tryfirst=True)
def skulk_find_model(ref, node):  # type: ignore[no-untyped-def]
    _record("skulk_find_model", ref=ref, node=node)
    return None


@hookimpl(tryfirst=True)
def skulk_model_resolver(card, node):  # type: ignore[no-untyped-def]
    _record("skulk_model_resolver", card=card, node=node)
    if card.id == "recorded":
        return ReadyFiles(ModelFiles("recorded", "gguf", node.data_dir / "recorded.gguf"), source="recorder")
    return None


@hookimpl
def skulk_local_models(node):  # type: ignore[no-untyped-def]
    _record("skulk_local_models", node=node)
    return [LocalModel("recorded", node.data_dir / "recorded.gguf", 1, "recorder")]


@hookimpl
def skulk_evict_model(model_id, node):  # type: ignore[no-untyped-def]
    _record("skulk_evict_model", model_id=model_id, node=node)
    return model_id == "recorded"


@hookimpl
def skulk_event(event):  # type: ignore[no-untyped-def]
    _record("skulk_event", event=event)


@hookimpl
def skulk_trace(span):  # type: ignore[no-untyped-def]
    _record("skulk_trace", span=span)


@hookimpl
def skulk_metric(sample):  # type: ignore[no-untyped-def]
    _record("skulk_metric", sample=sample)


@hookimpl
def skulk_register_http(registry, node):  # type: ignore[no-untyped-def]
    _record("skulk_register_http", registry=registry, node=node)


@hookimpl
def skulk_register_commands(registry):  # type: ignore[no-untyped-def]
    _record("skulk_register_commands", registry=registry)


@hookimpl
def skulk_config_sections(registry):  # type: ignore[no-untyped-def]
    _record("skulk_config_sections", registry=registry)
    registry.add("recorder", RecorderSection)


@hookimpl
def skulk_register_services(registry, node):  # type: ignore[no-untyped-def]
    _record("skulk_register_services", registry=registry, node=node)
