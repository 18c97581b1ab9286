"""Building the plugin manager, and the typed facade the rest of Skulk calls hooks through.

Load order (docs/plugins.md):

1. blocked names (``--no-plugin``, ``plugins.block``) are blocked, unless also named with ``--plugin``;
2. builtin plugins (``skulk_core.builtin.*``);
3. entry points in the group ``skulk``, unless autoload is off; when ``SKULK_PLUGINS`` is set, only
   the entry points it names (an empty value loads none);
4. plugins named with ``--plugin`` (an entry point name, an importable module, or a ``.py`` file),
   loaded even if blocked or filtered out above.

Then ``check_pending()`` fails start-up on any hook implementation that matches no spec.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy
from attrs import field, frozen

from skulk_core import hookspecs
from skulk_core.errors import PluginError, SkulkError
from skulk_core.registry import (
    BackendRegistry,
    CommandRegistry,
    ConfigSectionRegistry,
    HttpRegistry,
    ServiceRegistry,
    TransportRegistry,
)

if TYPE_CHECKING:
    from skulk_core.model import ModelCard
    from skulk_core.node import Node
    from skulk_core.placement import NodeView, Placement, PlacementPreview, PlacementRequest
    from skulk_core.storage import LocalModel, ModelResolver
    from skulk_core.telemetry import ClusterEvent, MetricSample, TraceSpan

log = logging.getLogger("skulk.plugins")

ENTRY_POINT_GROUP = "skulk"
TRACE_ENV = "SKULK_TRACE_PLUGINS"
ALLOWLIST_ENV = "SKULK_PLUGINS"

# (name, module) of the plugins that ship inside skulk_core, in load order.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("storage-local", "skulk_core.builtin.storage"),
    ("placement-pipeline", "skulk_core.builtin.placement"),
    ("http-core", "skulk_core.builtin.http"),
    ("jsonlog", "skulk_core.builtin.jsonlog"),
)


@frozen
class PluginSelection:
    """Which plugins to load; see the module docstring for the order."""

    plugins: tuple[str, ...] = field(default=(), converter=tuple)  # --plugin
    blocked: tuple[str, ...] = field(default=(), converter=tuple)  # --no-plugin
    autoload: bool = True  # --no-autoload turns it off
    allowlist: tuple[str, ...] | None = None  # SKULK_PLUGINS; None when unset

    @classmethod
    def from_environment(cls, **kwargs: Any) -> PluginSelection:
        raw = os.environ.get(ALLOWLIST_ENV)
        allow = None if raw is None else tuple(p.strip() for p in raw.split(",") if p.strip())
        return cls(allowlist=allow, **kwargs)


@frozen
class PluginInfo:
    """One loaded plugin, as ``skulk plugins`` shows it."""

    name: str
    source: str  # "builtin", "entrypoint", "module", "file"
    distribution: str | None
    version: str | None
    target: str  # module path, entry point value or file path
    hooks: tuple[str, ...]


def _core_version() -> str:
    from skulk_core import __version__

    return __version__


class Plugins:
    """The typed facade over the plugin manager: ``plugins.place(card, nodes, request)``."""

    def __init__(self, pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
        self.pm = pm
        self._infos = infos
        self._backends: BackendRegistry | None = None
        self._transports: TransportRegistry | None = None
        self._sections: ConfigSectionRegistry | None = None

    # -- introspection ---------------------------------------------------------------------
    def describe(self) -> list[PluginInfo]:
        out = []
        for name, info in self._infos.items():
            plugin = self.pm.get_plugin(name)
            if plugin is None:
                continue
            hooks = tuple(sorted(h.name for h in (self.pm.get_hookcallers(plugin) or ())))
            out.append(PluginInfo(info.name, info.source, info.distribution, info.version, info.target, hooks))
        return out

    def names(self) -> list[str]:
        return [i.name for i in self.describe()]

    # -- registration hooks ----------------------------------------------------------------
    R = TypeVar("R")

    def _register(self, hook_name: str, registry: R, **kwargs: Any) -> R:
        """Call each implementation of a registration hook with the registry told who is calling,
        so duplicates name both plugins and failures name the plugin at fault."""
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):  # pluggy's own call order
            if impl.hookwrapper or impl.wrapper:
                continue
            registry.current_plugin = impl.plugin_name  # type: ignore[attr-defined]
            args = {"registry": registry, **kwargs}
            if _tracing():
                log.info("hook %s -> %s", hook_name, impl.plugin_name)
            try:
                impl.function(**{name: args[name] for name in impl.argnames})
            except SkulkError:
                raise
            except Exception as exc:
                raise PluginError(impl.plugin_name, f"{hook_name} raised {exc!r}") from exc
        return registry

    def backends(self) -> BackendRegistry:
        if self._backends is None:
            self._backends = self._register("skulk_register_backends", BackendRegistry())
        return self._backends

    def transports(self) -> TransportRegistry:
        if self._transports is None:
            self._transports = self._register("skulk_register_transports", TransportRegistry())
        return self._transports

    def config_sections(self) -> ConfigSectionRegistry:
        if self._sections is None:
            self._sections = self._register("skulk_config_sections", ConfigSectionRegistry())
        return self._sections

    def commands(self) -> CommandRegistry:
        return self._register("skulk_register_commands", CommandRegistry())

    def services(self, node: Node) -> ServiceRegistry:
        return self._register("skulk_register_services", ServiceRegistry(), node=node)

    def http(self, node: Node) -> HttpRegistry:
        return self._register("skulk_register_http", HttpRegistry(), node=node)

    # -- placement -------------------------------------------------------------------------
    def place(
        self, card: ModelCard, nodes: Sequence[NodeView], request: PlacementRequest, settings: Mapping[str, object] | None = None
    ) -> Placement | None:
        """``settings``: the placing node's config sections by name (``Config.extra``)."""
        return self.pm.hook.skulk_place(card=card, nodes=list(nodes), request=request, backends=self.backends(), settings=dict(settings or {}))

    def placement_previews(
        self, card: ModelCard, nodes: Sequence[NodeView], request: PlacementRequest, settings: Mapping[str, object] | None = None
    ) -> list[PlacementPreview]:
        results = self.pm.hook.skulk_placement_previews(
            card=card, nodes=list(nodes), request=request, backends=self.backends(), settings=dict(settings or {})
        )
        return [p for result in results for p in result]

    # -- storage ---------------------------------------------------------------------------
    def find_model(self, ref: str, node: Node) -> ModelCard | None:
        return self.pm.hook.skulk_find_model(ref=ref, node=node)

    def model_resolver(self, card: ModelCard, node: Node) -> ModelResolver | None:
        return self.pm.hook.skulk_model_resolver(card=card, node=node)

    def local_models(self, node: Node) -> list[LocalModel]:
        return [m for result in self.pm.hook.skulk_local_models(node=node) for m in result]

    def evict_model(self, model_id: str, node: Node) -> bool:
        return any(self.pm.hook.skulk_evict_model(model_id=model_id, node=node))

    # -- telemetry: a failing telemetry plugin is logged, never allowed to break the node ---
    def event(self, event: ClusterEvent) -> None:
        self._telemetry("skulk_event", event=event)

    def trace(self, span: TraceSpan) -> None:
        self._telemetry("skulk_trace", span=span)

    def metric(self, sample: MetricSample) -> None:
        self._telemetry("skulk_metric", sample=sample)

    def _telemetry(self, hook_name: str, **kwargs: Any) -> None:
        try:
            getattr(self.pm.hook, hook_name)(**kwargs)
        except Exception:
            log.exception("a telemetry plugin failed in %s", hook_name)


def _tracing() -> bool:
    return os.environ.get(TRACE_ENV, "") not in ("", "0", "false", "no")


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _load_failed(name: str, target: str, exc: BaseException) -> PluginError:
    return PluginError(
        name,
        f"failed to load {target}: {type(exc).__name__}: {exc}. Fix or uninstall the plugin, "
        f"or start without it: --no-plugin {name}",
    )


def _module_from_file(path: Path) -> Any:
    module_name = f"skulk_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def make_plugin_manager(selection: PluginSelection | None = None) -> Plugins:
    """Build a fresh plugin manager with the load order above and return its facade."""
    selection = selection or PluginSelection.from_environment()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    for spec_class in hookspecs.SPEC_CLASSES:
        pm.add_hookspecs(spec_class)
    if _tracing():
        pm.add_hookcall_monitoring(
            lambda name, impls, kwargs: log.info(
                "hook %s(%s) -> %s", name, ", ".join(kwargs), [i.plugin_name for i in impls]
            ),
            lambda outcome, name, impls, kwargs: None,
        )
    infos: dict[str, PluginInfo] = {}
    explicit = set(selection.plugins)

    def register(plugin: object, info: PluginInfo) -> None:
        try:
            pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(info.name, f"{exc}. Check the hook's name and arguments in docs/hooks.md") from exc
        except ValueError as exc:  # already registered under that name
            first = infos.get(info.name)
            loaded = f" ({first.source} {first.target})" if first else ""
            raise PluginError(
                info.name,
                f"two plugins share this name: one is already loaded{loaded}, so {info.target} cannot be. "
                f"Rename one of them, or leave one out",
            ) from exc
        infos[info.name] = info

    # 1. blocked names
    for name in selection.blocked:
        if name not in explicit:
            pm.set_blocked(name)

    # 2. builtins
    version = _core_version()
    for name, module_path in BUILTIN_PLUGINS:
        if pm.is_blocked(name):
            continue
        try:
            module = importlib.import_module(module_path)
        except Exception as exc:  # a broken core install
            raise _load_failed(name, module_path, exc) from exc
        plugin = getattr(module, "plugin", module)  # a module may export a stateful instance
        plugin = plugin() if isinstance(plugin, type) else plugin
        register(plugin, PluginInfo(name, "builtin", "skulk", version, module_path, ()))

    # 3. entry points
    eps = _entry_points()

    def load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
        try:
            plugin = ep.load()
        except Exception as exc:
            raise _load_failed(ep.name, ep.value, exc) from exc
        dist = ep.dist
        register(
            plugin,
            PluginInfo(ep.name, "entrypoint", dist.name if dist else None, dist.version if dist else None, ep.value, ()),
        )

    if selection.autoload:
        allowed = None if selection.allowlist is None else set(selection.allowlist)
        for name, ep in eps.items():
            if pm.is_blocked(name) or name in infos:
                continue
            if allowed is not None and name not in allowed:
                continue
            load_entry_point(ep)

    # 4. explicitly named plugins, loaded even if blocked
    for target in selection.plugins:
        path = Path(target)
        if target in eps:
            name = target
            if name in infos:
                continue
            pm.unblock(name)
            load_entry_point(eps[name])
        elif target.endswith(".py") or os.sep in target:
            name = path.stem
            if not path.is_file():
                raise PluginError(name, f"no plugin file at {path}; --plugin takes an entry point name, a module or a .py file")
            pm.unblock(name)
            try:
                module = _module_from_file(path.resolve())
            except Exception as exc:
                raise _load_failed(name, str(path), exc) from exc
            register(module, PluginInfo(name, "file", None, None, str(path.resolve()), ()))
        else:
            name = target
            if name in infos:
                continue
            pm.unblock(name)
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as exc:
                # only when ``target`` itself (or a parent package) is missing, not a module it imports
                if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
                    raise PluginError(
                        name,
                        f"no entry point, module or file named {target!r}; installed plugins: "
                        f"{', '.join(sorted(eps)) or 'none'}",
                    ) from exc
                raise _load_failed(name, target, exc) from exc
            except Exception as exc:
                raise _load_failed(name, target, exc) from exc
            dist_name, dist_version = _distribution_of(module)
            register(module, PluginInfo(name, "module", dist_name, dist_version, target, ()))

    # check_pending: a hookimpl that matches no spec (a typo) must fail start-up, naming it
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin_name = pm.get_name(exc.plugin) or "?"
        raise PluginError(
            plugin_name,
            f"{exc}. Known hooks: {', '.join(hookspecs.hook_names())} (see docs/hooks.md)",
        ) from exc
    return Plugins(pm, infos)


def _distribution_of(module: Any) -> tuple[str | None, str | None]:
    top = module.__name__.split(".")[0]
    for dist_name in importlib.metadata.packages_distributions().get(top, []):
        try:
            return dist_name, importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None
