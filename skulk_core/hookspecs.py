"""Skulk's hook specifications, one class per concern.

Hooks are synchronous and cheap: they register factories, or return values and objects whose
methods are ``async``. Every hook name starts with ``skulk_``. Unless a spec says ``firstresult``,
every implementation is called and the results are collected in a list. See docs/hooks.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from skulk_core.model import ModelCard
    from skulk_core.node import Node
    from skulk_core.placement import NodeView, Placement, PlacementPreview, PlacementRequest
    from skulk_core.registry import (
        BackendRegistry,
        CommandRegistry,
        ConfigSectionRegistry,
        HttpRegistry,
        ServiceRegistry,
        TransportRegistry,
    )
    from skulk_core.storage import LocalModel, ModelResolver
    from skulk_core.telemetry import ClusterEvent, MetricSample, TraceSpan

PROJECT = "skulk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class TransportSpecs:
    """How nodes reach each other."""

    @hookspec
    def skulk_register_transports(self, registry: TransportRegistry) -> None:
        """Register transport factories by name.

        Called once per node start, before any service starts. ``registry.add(name, factory)``;
        ``factory(context: TransportContext) -> Transport`` (see :mod:`skulk_core.transport`).
        The node uses the transport named by ``transport.name`` in its config (default ``tcp``).
        A name registered twice stops start-up with an error naming both plugins.
        """


class PlacementSpecs:
    """Where a model runs."""

    @hookspec(firstresult=True)
    def skulk_place(
        self,
        card: ModelCard,
        nodes: Sequence[NodeView],
        request: PlacementRequest,
        backends: BackendRegistry,
        settings: Mapping[str, object],
    ) -> Placement | None:
        """Choose the nodes, layer ranges and backends for a new instance of ``card``.

        Called by the master when an instance is requested (``skulk run --model``,
        ``POST /place_instance``) and again when a node of a placed instance leaves.
        ``nodes`` are the live nodes; ``backends`` gives each backend's capabilities and memory
        estimate; ``settings`` are the placing node's config sections by name (a backend's, such as
        ``torch``, is what ``EngineOptions.settings`` holds when that backend loads, and what its
        ``estimate_memory`` should be asked with: ``torch.quantize: int8`` holds a quarter of the
        bytes). An implementation may leave out any argument it does not use. Return a
        :class:`Placement`, or None to defer to the next implementation.
        **firstresult**: the first non-None placement wins. The builtin memory-weighted pipeline
        placement runs last (``trylast``), so any plugin can take precedence. Raise
        :class:`~skulk_core.errors.PlacementError` to say that nothing can hold the model.
        """

    @hookspec
    def skulk_placement_previews(
        self,
        card: ModelCard,
        nodes: Sequence[NodeView],
        request: PlacementRequest,
        backends: BackendRegistry,
        settings: Mapping[str, object],
    ) -> list[PlacementPreview]:
        """Every placement this plugin would accept for ``card``, for ``GET /instance/previews``.

        Same arguments as :func:`skulk_place`. Every implementation is called; their lists are
        concatenated.
        """


class BackendSpecs:
    """What runs a model's layers."""

    @hookspec
    def skulk_register_backends(self, registry: BackendRegistry) -> None:
        """Register backends by name: ``registry.add(name, factory)``.

        Called once per process, when the plugin set is built. ``factory() -> Backend`` must be
        cheap (import torch, mlx or llama_cpp inside ``Backend.load``, not at import time). The
        backend's ``capabilities`` tell placement what it can run; see :mod:`skulk_core.backend`.
        """


class StorageSpecs:
    """How a model becomes files on this node."""

    @hookspec(firstresult=True)
    def skulk_find_model(self, ref: str, node: Node) -> ModelCard | None:
        """Turn a user's model reference (``--model``, a request's ``model``) into a card.

        ``ref`` is an id, a path or a plugin-specific form (``hf:owner/repo:file.gguf``). Called
        when a node starts with ``--model`` and when an instance is requested. Return None if this
        plugin does not know ``ref``. **firstresult**. The builtin resolves the default model's id
        and paths to local GGUF files; it runs last.
        """

    @hookspec(firstresult=True)
    def skulk_model_resolver(self, card: ModelCard, node: Node) -> ModelResolver | None:
        """Return a resolver that can put ``card``'s files on this node, or None.

        Called on every node of a placement before it loads its stage. **firstresult**: the chain
        is local path (builtin, ``tryfirst``), then shared store, then Hugging Face (``trylast``).
        Only the returned resolver's ``fetch()`` does I/O.
        """

    @hookspec
    def skulk_local_models(self, node: Node) -> list[LocalModel]:
        """Models whose files this plugin holds on this node (for heartbeats and ``/state``).

        Every implementation is called; the lists are concatenated.
        """

    @hookspec
    def skulk_evict_model(self, model_id: str, node: Node) -> bool:
        """Delete ``model_id``'s files held by this plugin; True if anything was removed.

        Every implementation is called, so every store holding the model frees it.
        """


class TelemetrySpecs:
    """Events, traces and metrics. Every implementation receives every value; keep them fast
    (no network I/O in the hook itself: queue it)."""

    @hookspec
    def skulk_event(self, event: ClusterEvent) -> None:
        """A cluster event happened (node started, peer joined, master elected, ...)."""

    @hookspec
    def skulk_trace(self, span: TraceSpan) -> None:
        """A request finished one traced step (queue, prefill, decode, a pipeline stage)."""

    @hookspec
    def skulk_metric(self, sample: MetricSample) -> None:
        """A metric was measured (tokens generated, step latency, memory in use, ...)."""


class FrontendSpecs:
    """What the node serves on its HTTP port."""

    @hookspec
    def skulk_register_http(self, registry: HttpRegistry, node: Node) -> None:
        """Contribute routes and ASGI apps to the node's HTTP server (``--api-port``, 52415).

        Called once when the node starts its HTTP service. ``registry.route(method, path,
        handler)`` adds an exact JSON route; ``registry.mount(prefix, app)`` mounts an ASGI app
        (Quart, Starlette, ...). A path claimed twice stops start-up with both plugins named.
        """


class CliSpecs:
    """Subcommands of ``skulk``."""

    @hookspec
    def skulk_register_commands(self, registry: CommandRegistry) -> None:
        """Add subcommands: ``registry.add(name, command)`` with a ``click.Command``.

        Called when ``skulk`` starts, with the plugins that ``SKULK_PLUGINS``, the config file and
        autoload allow (``--plugin`` of ``skulk run`` is parsed too late to add commands).
        """


class NodeSpecs:
    """The node's configuration and long-running services."""

    @hookspec
    def skulk_config_sections(self, registry: ConfigSectionRegistry) -> None:
        """Claim a top-level ``skulk.yaml`` section: ``registry.add(name, attrs_class)``.

        Called after plugins load, before the config is validated. The section is structured with
        cattrs; unknown keys, wrong types and failing validators stop start-up naming the key and
        the file. Each field is also read from ``SKULK_<SECTION>_<FIELD>``.
        """

    @hookspec
    def skulk_register_services(self, registry: ServiceRegistry, node: Node) -> None:
        """Add long-running services: ``registry.add(name, service)``.

        Called once when the node starts. ``async def service(node, *, task_status)`` runs in the
        node's task group, calls ``task_status.started()`` when ready, and is cancelled on
        shutdown (clean up in ``finally`` under a shielded cancel scope).
        """


SPEC_CLASSES = (
    TransportSpecs,
    PlacementSpecs,
    BackendSpecs,
    StorageSpecs,
    TelemetrySpecs,
    FrontendSpecs,
    CliSpecs,
    NodeSpecs,
)


def hook_names() -> list[str]:
    return [name for cls in SPEC_CLASSES for name in vars(cls) if name.startswith("skulk_")]
