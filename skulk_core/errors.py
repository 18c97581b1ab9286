"""Skulk's own exception hierarchy: callers catch one family, whatever library failed underneath."""

from __future__ import annotations


class SkulkError(Exception):
    """Base of every error Skulk raises on purpose. The message is meant for the user."""


class PluginError(SkulkError):
    """A plugin could not be loaded, or broke a rule of the plugin contract."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class DuplicateNameError(PluginError):
    """Two plugins registered the same name in one registry."""

    def __init__(self, kind: str, name: str, first: str, second: str) -> None:
        self.kind = kind
        self.name = name
        self.first = first
        self.second = second
        SkulkError.__init__(
            self,
            f"{kind} {name!r} is registered by both plugin {first!r} and plugin {second!r}; "
            f"block one of them with --no-plugin {second} (or --no-plugin {first})",
        )
        self.plugin = second


class ConfigError(SkulkError):
    """The configuration (file, environment or command line) is invalid."""


class ModelError(SkulkError):
    """A model could not be found, read or loaded."""


class PlacementError(SkulkError):
    """No placement can hold the model on the live nodes."""


class BackendError(SkulkError):
    """A backend failed to load a shard or to run a step."""


class RequestError(SkulkError):
    """A request is invalid for the model that would serve it (too long, bad parameter)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class TransportError(SkulkError):
    """A peer could not be reached, or a connection broke."""


class AuthenticationError(TransportError):
    """A peer failed to prove it holds the cluster secret."""


class ProtocolError(TransportError):
    """A peer sent something that is not a valid message of this protocol version."""
