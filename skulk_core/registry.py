"""Typed registries handed to registration hooks: ``registry.add(name, thing)``.

Every entry remembers the plugin that added it, so a duplicate name is refused with an error that
names both plugins. The plugin facade sets :attr:`Registry.current_plugin` around each hook
implementation it calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from attrs import frozen

from skulk_core.errors import DuplicateNameError, PluginError

if TYPE_CHECKING:
    from skulk_core.backend import Backend
    from skulk_core.transport import Transport, TransportContext

T = TypeVar("T")


@frozen
class Entry(Generic[T]):
    name: str
    value: T
    plugin: str


class Registry(Generic[T]):
    """Name -> value, refusing duplicates. ``kind`` names what is registered, for messages."""

    kind = "entry"

    def __init__(self) -> None:
        self._entries: dict[str, Entry[T]] = {}
        self.current_plugin = "<unknown>"

    def add(self, name: str, value: T) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(self.current_plugin, f"registered a {self.kind} with an empty or non-string name {name!r}")
        if name in self._entries:
            raise DuplicateNameError(self.kind, name, self._entries[name].plugin, self.current_plugin)
        self._entries[name] = Entry(name, value, self.current_plugin)

    def get(self, name: str) -> T:
        try:
            return self._entries[name].value
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"no {self.kind} named {name!r} is registered (registered: {known})") from None

    def entry(self, name: str) -> Entry[T]:
        self.get(name)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)


TransportFactory = Callable[["TransportContext"], "Transport"]
BackendFactory = Callable[[], "Backend"]
# A service runs for the node's lifetime: ``async def service(node, *, task_status)``; it calls
# ``task_status.started()`` once ready and returns (or is cancelled) when the node stops.
Service = Callable[..., Awaitable[None]]


class TransportRegistry(Registry[TransportFactory]):
    """``add(name, factory)``: ``factory(context: TransportContext) -> Transport``."""

    kind = "transport"


class BackendRegistry(Registry[BackendFactory]):
    """``add(name, factory)``: ``factory() -> Backend``, cheap (no heavy imports)."""

    kind = "backend"

    def __init__(self) -> None:
        super().__init__()
        self._instances: dict[str, Backend] = {}

    def backend(self, name: str) -> Backend:
        """The backend registered as ``name``, constructed once."""
        if name not in self._instances:
            entry = self.entry(name)
            try:
                self._instances[name] = entry.value()
            except Exception as exc:
                raise PluginError(entry.plugin, f"backend {name!r} failed to construct: {exc}") from exc
        return self._instances[name]


class CommandRegistry(Registry[Any]):
    """``add(name, command)``: a ``click.Command`` added to ``skulk`` as a subcommand."""

    kind = "command"


class ServiceRegistry(Registry[Service]):
    """``add(name, service)``: ``async def service(node, *, task_status)``, run in the node's task group."""

    kind = "service"


class ConfigSectionRegistry(Registry[type]):
    """``add(name, cls)``: the top-level ``skulk.yaml`` key ``name`` is structured into the attrs
    class ``cls`` (with cattrs). Validators on ``cls`` run; raise ``ValueError`` with a message
    that names the field. Each field is also read from ``SKULK_<NAME>_<FIELD>``."""

    kind = "config section"


class HttpRegistry:
    """What the frontend hook fills: exact JSON routes and mounted ASGI apps.

    ``route(method, path, handler)``: ``async def handler(request: HttpRequest) -> HttpResponse``;
    a ``{name}`` path segment matches any one segment (``request.path_params["name"]``).
    ``mount(prefix, app)``: an ASGI app that receives every request whose path is ``prefix`` or
    below it (the scope's path is left whole). Exact routes win over mounts; the longest prefix wins
    among mounts.
    """

    def __init__(self) -> None:
        self.routes = Registry[Any]()
        self.routes.kind = "HTTP route"
        self.mounts = Registry[Any]()
        self.mounts.kind = "HTTP mount"

    @property
    def current_plugin(self) -> str:
        return self.routes.current_plugin

    @current_plugin.setter
    def current_plugin(self, plugin: str) -> None:
        self.routes.current_plugin = plugin
        self.mounts.current_plugin = plugin

    def route(self, method: str, path: str, handler: Callable[..., Awaitable[Any]]) -> None:
        self.routes.add(f"{method.upper()} {path}", handler)

    def mount(self, prefix: str, app: Any) -> None:
        if not prefix.startswith("/"):
            raise PluginError(self.current_plugin, f"mount prefix {prefix!r} must start with '/'")
        self.mounts.add(prefix.rstrip("/") or "/", app)
