"""The node configuration: ``skulk.yaml``, ``SKULK_*`` variables and command-line options.

Precedence, lowest first: built-in defaults, ``skulk.yaml``, its ``node_overrides`` entry for this
host (then for this node id), ``SKULK_<SECTION>_<FIELD>`` environment variables, command-line
options. Every section is an attrs class structured with cattrs, so an unknown key, a wrong type or
a bad value stops start-up with a message naming the key and the file. Plugins add sections through
the ``skulk_config_sections`` hook; those are validated once plugins are loaded.
"""

from __future__ import annotations

import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from attrs import field, frozen
from cattrs.v import format_exception

from skulk_core.errors import ConfigError

CONFIG_ENV = "SKULK_CONFIG"
HOME_ENV = "SKULK_HOME"  # alias of SKULK_NODE_DATA_DIR
DEFAULT_CONFIG_NAME = "skulk.yaml"
OVERRIDES_KEY = "node_overrides"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_size(text: str | int) -> int:
    """``"8GiB"``, ``"512MB"``, ``"1.5G"`` or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 8GiB, 512MB, 1073741824)")
    number, unit = match.groups()
    unit = (unit or "").lower()
    binary = "i" in unit
    base = unit[:1] if unit not in ("b", "") else ""
    factor = 1024 ** "bkmgt".index(base) if binary and base else _UNITS[base]
    return int(float(number) * factor)


def _port(_: object, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be a port number between 0 and 65535, got {value}")


def _size(_: object, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None:
        try:
            parse_size(value)
        except ValueError as exc:
            raise ValueError(f"{attribute.name}: {exc}") from None


def _one_of(*choices: str) -> Any:
    def check(_: object, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _positive(_: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and (value < 1 if isinstance(value, int) else value <= 0):
        raise ValueError(f"{attribute.name} must be {'at least 1' if isinstance(value, int) else 'positive'}, got {value}")


@frozen
class NodeSection:
    name: str | None = None  # default: the host name
    data_dir: str | None = None  # default: ~/.skulk (SKULK_HOME)
    memory_limit: str | None = field(default=None, validator=_size)  # e.g. "4GiB"
    log_level: str = field(default="info", validator=_one_of("debug", "info", "warning", "error"))
    # "auto": uvloop where it is installed (it is a dependency on Linux and macOS), else asyncio's own
    event_loop: str = field(default="auto", validator=_one_of("auto", "asyncio", "uvloop"))

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit is None else parse_size(self.memory_limit)


@frozen
class ApiSection:
    host: str = "127.0.0.1"
    port: int = field(default=52415, validator=_port)
    key: str | None = field(default=None, repr=False)  # SKULK_API_KEY; Bearer token required when set


@frozen
class PluginsSection:
    load: tuple[str, ...] = ()  # like --plugin
    block: tuple[str, ...] = ()  # like --no-plugin
    autoload: bool = True


@frozen
class ServeSection:
    """What this node serves once it is up."""

    model: str | None = None  # None: the default model
    backend: str | None = None  # None: the first registered backend that supports the model
    min_nodes: int = field(default=1, validator=_positive)
    context_length: int | None = field(default=None, validator=_positive)  # None: min(card, 4096)
    max_sequences: int = field(default=8, validator=_positive)  # sequences decoded together
    threads: int | None = field(default=None, validator=_positive)
    enabled: bool = True  # False: start a node that serves nothing until asked


@frozen
class ClusterSection:
    key: str | None = field(default=None, repr=False)  # the cluster secret itself (SKULK_CLUSTER_KEY)
    key_file: str | None = None  # a file holding the cluster secret
    peers: tuple[str, ...] = ()  # HOST:PORT of nodes to dial
    discovery: bool = True
    discovery_port: int = field(default=52417, validator=_port)
    force_master: bool = False
    heartbeat_interval: float = field(default=0.5, validator=_positive)
    node_timeout: float = field(default=3.0, validator=_positive)  # silence before a node is gone


@frozen
class TransportSection:
    name: str = "tcp"
    host: str = "0.0.0.0"
    port: int = field(default=52416, validator=_port)
    direct_links: bool = True  # pipeline steps between stages on direct sockets (skulk_core.links), not the transport
    links_port: int = field(default=0, validator=_port)  # where direct links are accepted; 0: a free port


@frozen
class TelemetrySection:
    log_max_bytes: str = field(default="10MiB", validator=_size)
    log_backups: int = 5


CORE_SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "api": ApiSection,
    "plugins": PluginsSection,
    "serve": ServeSection,
    "cluster": ClusterSection,
    "transport": TransportSection,
    "telemetry": TelemetrySection,
}

# Environment names that are not SKULK_<SECTION>_<FIELD>.
ENV_ALIASES = {HOME_ENV: ("node", "data_dir")}


@frozen
class Config:
    node: NodeSection = NodeSection()
    api: ApiSection = ApiSection()
    plugins: PluginsSection = PluginsSection()
    serve: ServeSection = ServeSection()
    cluster: ClusterSection = ClusterSection()
    transport: TransportSection = TransportSection()
    telemetry: TelemetrySection = TelemetrySection()
    extra: Mapping[str, object] = field(factory=dict)  # plugin sections, structured
    source: Path | None = None

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir or Path.home() / ".skulk").expanduser()

    def section(self, name: str) -> object:
        """A plugin's section (its attrs instance, defaults if absent from the file)."""
        if name in CORE_SECTIONS:
            return getattr(self, name)
        try:
            return self.extra[name]
        except KeyError:
            raise KeyError(f"no config section {name!r}; is its plugin loaded?") from None


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


class _WrongType(ValueError):
    """A value of the wrong YAML type; the message says what was expected."""


# cattrs' own scalar hooks call bool(), int(), float() and str() on anything, so ``autoload: "false"``
# would be True and ``peers: "host:1"`` a tuple of characters. These hooks accept only the right
# shapes (strings for numbers too: that is how environment variables arrive).
def _structure_bool(value: object, _: type) -> bool:
    if isinstance(value, bool):
        return value
    raise _WrongType(f"expected true or false, got {value!r}")


def _structure_int(value: object, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _WrongType(f"expected an integer, got {value!r}")


def _structure_float(value: object, _: type) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _WrongType(f"expected a number, got {value!r}")


def _structure_str(value: object, _: type) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # ``name: 42`` in YAML
    raise _WrongType(f"expected a string, got {value!r}")


def _structure_str_or_bool(value: object, _: type) -> str | bool:
    # A mode that is also on or off (``decode_ahead: auto``, or ``false``): YAML reads ``off``,
    # ``no`` and ``false`` as booleans, which the field's own converter then names.
    return value if isinstance(value, bool) else _structure_str(value, str)


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _tuple_hook(tp: Any) -> Any:
    item = typing.get_args(tp)[0]

    def structure(value: object, _: type) -> tuple:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple, set, frozenset)):
            raise _WrongType(f"expected a list, got {value!r}")
        return tuple(_converter.structure(v, item) for v in value)

    return structure


_converter.register_structure_hook(bool, _structure_bool)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(float, _structure_float)
_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(str | bool, _structure_str_or_bool)
_converter.register_structure_hook_factory(_is_homogeneous_tuple, _tuple_hook)


def _describe(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, _WrongType):
        return str(exc)
    if isinstance(exc, ValueError) and type_ is None:
        return str(exc)  # a validator's message, which names the field
    return format_exception(exc, type_)


def _where(source: Path | None) -> str:
    return str(source) if source else "the configuration"


def _structure(name: str, cls: type, data: object, source: Path | None) -> object:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source)}: section {name!r} must be a mapping, got {type(data).__name__}")
    try:
        return _converter.structure(dict(data), cls)
    except Exception as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            details = cattrs.transform_error(exc, path=name, format_exception=_describe)
        else:
            details = [f"{exc} @ {name}"]
        # cattrs writes "message @ path"; say "path: message", so the key comes first (once: a
        # plugin's validator may name its key as "section.key" already)
        pretty = "; ".join(
            message if message.startswith(f"{path}.") else f"{path}: {message}"
            for message, _, path in (d.rpartition(" @ ") for d in details)
        )
        raise ConfigError(f"{_where(source)}: invalid configuration: {pretty}") from None


def _deep_merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_value(text: str, tp: Any) -> object:
    """Parse an environment string for a field of type ``tp``."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if text == "":
            return None
        if set(args) == {str, bool}:  # a mode that is also on or off: the words YAML reads as booleans
            lowered = text.strip().lower()
            return lowered in _TRUE if lowered in _TRUE + _FALSE else text
        return _env_value(text, args[0])
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE or lowered == "":
            return False
        raise ValueError(f"{text!r} is not a boolean (use true or false)")
    if origin in (tuple, list):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text  # cattrs converts str -> int and checks it


def _env_overrides(env: Mapping[str, str], sections: Mapping[str, type]) -> dict:
    out: dict[str, dict] = {}
    for section_name, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for attribute in attrs.fields(cls):
            # aliases first, so the canonical SKULK_<SECTION>_<FIELD> wins when both are set
            names = [alias for alias, target in ENV_ALIASES.items() if target == (section_name, attribute.name)]
            names.append(f"SKULK_{section_name}_{attribute.name}".upper())
            for env_name in names:
                if env_name in env:
                    try:
                        value = _env_value(env[env_name], hints[attribute.name])
                    except ValueError as exc:
                        raise ConfigError(f"environment variable {env_name}: {exc}") from None
                    out.setdefault(section_name, {})[attribute.name] = value
    return out


@frozen
class ConfigLoader:
    """Holds the raw layers so the config can be resolved again once plugins add sections."""

    document: Mapping[str, Any] = field(factory=dict)
    source: Path | None = None
    env: Mapping[str, str] = field(factory=lambda: dict(os.environ))
    cli: Mapping[str, Mapping[str, Any]] = field(factory=dict)  # {"api": {"port": 1}}
    hostname: str = field(factory=socket.gethostname)

    @classmethod
    def from_file(
        cls,
        path: str | Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cli: Mapping[str, Mapping[str, Any]] | None = None,
        hostname: str | None = None,
    ) -> ConfigLoader:
        """Read ``path`` (or ``$SKULK_CONFIG``, or ``./skulk.yaml`` if present)."""
        env = dict(os.environ) if env is None else dict(env)
        explicit = path is not None or CONFIG_ENV in env
        chosen = Path(path) if path is not None else Path(env.get(CONFIG_ENV, DEFAULT_CONFIG_NAME))
        document: Mapping[str, Any] = {}
        source = None
        if chosen.is_file():
            import yaml

            source = chosen
            try:
                loaded = yaml.safe_load(chosen.read_text())
            except yaml.YAMLError as exc:
                raise ConfigError(f"{chosen}: not valid YAML: {exc}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{chosen}: the top level must be a mapping of sections, got {type(loaded).__name__}")
            document = loaded
        elif explicit:
            raise ConfigError(f"config file {chosen} does not exist")
        return cls(
            document=document,
            source=source,
            env=env,
            cli={k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in (cli or {}).items()},
            hostname=hostname or socket.gethostname(),
        )

    def _layers(self, node_id: str | None) -> dict:
        doc = {k: v for k, v in self.document.items() if k != OVERRIDES_KEY}
        overrides = self.document.get(OVERRIDES_KEY) or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{_where(self.source)}: {OVERRIDES_KEY} must map host names or node ids to sections")
        for key in (self.hostname, node_id):
            if key is not None and key in overrides:
                entry = overrides[key]
                if not isinstance(entry, Mapping):
                    raise ConfigError(f"{_where(self.source)}: {OVERRIDES_KEY}.{key} must be a mapping of sections")
                doc = _deep_merge(doc, entry)
        return doc

    def resolve(self, sections: Mapping[str, type] | None = None, *, node_id: str | None = None, strict: bool = True) -> Config:
        """Build the :class:`Config`. ``sections`` are the plugins' sections; with ``strict``,
        a top-level key that no core or plugin section claims is an error."""
        plugin_sections = dict(sections or {})
        for name in plugin_sections:
            if name in CORE_SECTIONS or name == OVERRIDES_KEY:
                raise ConfigError(f"a plugin tried to claim the reserved config section {name!r}")
        all_sections = {**CORE_SECTIONS, **plugin_sections}
        doc = self._layers(node_id)
        doc = _deep_merge(doc, _env_overrides(self.env, all_sections))
        doc = _deep_merge(doc, self.cli)
        unknown = [k for k in doc if k not in all_sections]
        if unknown and strict:
            raise ConfigError(
                f"{_where(self.source)}: unknown section {unknown[0]!r}; known sections: "
                f"{', '.join(sorted(all_sections))} (a plugin's section exists only while the plugin is loaded)"
            )
        core = {name: _structure(name, cls, doc.get(name), self.source) for name, cls in CORE_SECTIONS.items()}
        extra = {name: _structure(name, cls, doc.get(name), self.source) for name, cls in plugin_sections.items()}
        return Config(**core, extra=extra, source=self.source)  # type: ignore[arg-type]
