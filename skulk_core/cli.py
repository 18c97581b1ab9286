"""The ``skulk`` command: ``run``, ``plugins``, ``config`` and the subcommands plugins add."""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
from typing import Any

import click

from skulk_core.errors import SkulkError

log = logging.getLogger("skulk")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("hypercorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))


def _report_crashes() -> None:
    """A crash in native code (llama.cpp, torch) ends the process at once, before any log line:
    Python's fault handler then writes every thread's stack to stderr, so the log says where."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (a test's capture)
        pass


def _skulk_error(exc: BaseException) -> SkulkError | None:
    """The SkulkError inside ``exc``, looking through the exception groups task groups raise."""
    if isinstance(exc, SkulkError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _skulk_error(inner)
        if found is not None:
            return found
    return None


def plugin_options(func: Any) -> Any:
    """``--config``, ``--plugin``, ``--no-plugin`` and ``--no-autoload``, shared by commands."""
    func = click.option("--no-autoload", is_flag=True, default=None, flag_value=True, help="Load no entry-point plugins (builtins and --plugin still load).")(func)
    func = click.option("--no-plugin", "blocked", multiple=True, metavar="NAME", help="Block a plugin by name (repeatable).")(func)
    func = click.option("--plugin", "plugins", multiple=True, metavar="NAME", help="Load a plugin: an entry point name, a module, or a .py file (repeatable); loads it even if blocked.")(func)
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="SKULK_CONFIG", help="skulk.yaml to read (default: ./skulk.yaml if present).")(func)
    return func


class SkulkGroup(click.Group):
    """Adds the commands plugins register, loading plugins only when a command is looked up."""

    _plugin_commands: dict[str, click.Command] | None = None

    def _load_plugin_commands(self) -> dict[str, click.Command]:
        if self._plugin_commands is None:
            self._plugin_commands = {}
            try:
                from skulk_core.config import ConfigLoader
                from skulk_core.plugins import PluginSelection, make_plugin_manager

                core = ConfigLoader.from_file().resolve(strict=False)
                plugins = make_plugin_manager(
                    PluginSelection.from_environment(plugins=core.plugins.load, blocked=core.plugins.block, autoload=core.plugins.autoload)
                )
                for entry in plugins.commands():
                    if entry.name in self.commands:
                        raise SkulkError(f"plugin {entry.plugin!r} registers the command {entry.name!r}, which is built in")
                    self._plugin_commands[entry.name] = entry.value
            except SkulkError as exc:
                click.echo(f"warning: plugin commands unavailable: {exc}", err=True)
        return self._plugin_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._load_plugin_commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            command = self._load_plugin_commands().get(name)
        return command


def _version() -> str:
    from skulk_core import __version__

    return __version__


@click.group(cls=SkulkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", "-V", prog_name="skulk", message="%(prog)s %(version)s")
def cli() -> None:
    """Skulk: run one large language model across several ordinary machines."""


@cli.command()
@plugin_options
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Node data dir [default: ~/.skulk; env SKULK_HOME].")
@click.option("--node-name", default=None, help="Human name of this node [default: host name].")
@click.option("--api-host", default=None, help="HTTP API address [default: 127.0.0.1].")
@click.option("--api-port", type=int, default=None, help="HTTP API port [default: 52415].")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on the HTTP API [env SKULK_API_KEY].")
@click.option("--model", default=None, help="Model to serve: an id or a GGUF path [default: the default model].")
@click.option("--backend", default=None, help="Backend to run the model with [default: the first that supports it].")
@click.option("--min-nodes", type=int, default=None, help="Spread the model over at least N nodes.")
@click.option("--memory-limit", default=None, help="Memory this node may give to models, e.g. 4GiB.")
@click.option("--transport-host", default=None, help="Address the cluster transport listens on [default: 0.0.0.0].")
@click.option("--transport-port", type=int, default=None, help="Cluster transport port [default: 52416].")
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT", help="A node to join (repeatable); adds to cluster.peers.")
@click.option("--no-discovery", is_flag=True, default=None, flag_value=True, help="Do not announce or discover nodes on the LAN.")
@click.option("--discovery-port", type=int, default=None, help="UDP port for LAN discovery [default: 52417].")
@click.option("--force-master", is_flag=True, default=None, flag_value=True, help="Prefer this node in master elections.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
def run(
    config_path: str | None,
    plugins: tuple[str, ...],
    blocked: tuple[str, ...],
    no_autoload: bool | None,
    data_dir: str | None,
    node_name: str | None,
    api_host: str | None,
    api_port: int | None,
    api_key: str | None,
    model: str | None,
    backend: str | None,
    min_nodes: int | None,
    memory_limit: str | None,
    transport_host: str | None,
    transport_port: int | None,
    peers: tuple[str, ...],
    no_discovery: bool | None,
    discovery_port: int | None,
    force_master: bool | None,
    log_level: str | None,
) -> None:
    """Start a node and run it until SIGINT or SIGTERM."""
    import anyio

    from skulk_core.config import ConfigLoader
    from skulk_core.node import build_node

    cli_values = {
        "node": {"data_dir": data_dir, "name": node_name, "memory_limit": memory_limit, "log_level": log_level},
        "api": {"host": api_host, "port": api_port, "key": api_key},
        "serve": {"model": model, "backend": backend, "min_nodes": min_nodes},
        "transport": {"host": transport_host, "port": transport_port},
        "cluster": {
            "discovery": False if no_discovery else None,
            "discovery_port": discovery_port,
            "force_master": True if force_master else None,
        },
    }
    # Log from the start (SKULK_TRACE_PLUGINS traces hooks called while the node is built), then
    # switch to the configured level.
    _setup_logging(log_level or "info")
    _report_crashes()
    try:
        loader = ConfigLoader.from_file(config_path, cli=cli_values)
        node = build_node(loader, plugins=plugins, blocked=blocked, autoload=False if no_autoload else None, peers=peers)
    except SkulkError as exc:
        raise click.ClickException(str(exc)) from None
    _setup_logging(node.config.node.log_level)

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                await tg.start(node.run)
                log.info("node %s (%s) ready; HTTP API on %s", node.node_id, node.name, node.api_url)
                click.echo(f"skulk node {node.node_id} ready: {node.api_url}", err=True)
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    break

    use_uvloop = _use_uvloop(node.config.node.event_loop)
    log.info("event loop: %s", "uvloop" if use_uvloop else "asyncio")
    try:
        anyio.run(main, backend_options={"use_uvloop": use_uvloop})
    except Exception as exc:  # a service that fails to start arrives inside an exception group
        error = _skulk_error(exc)
        if error is None:
            raise
        raise click.ClickException(str(error)) from None
    log.info("node %s stopped", node.node_id)


@cli.command(name="plugins")
@plugin_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_command(config_path: str | None, plugins: tuple[str, ...], blocked: tuple[str, ...], no_autoload: bool | None, as_json: bool) -> None:
    """List loaded plugins: name, distribution, version and the hooks each implements."""
    from skulk_core.config import ConfigLoader
    from skulk_core.plugins import PluginSelection, make_plugin_manager

    try:
        core = ConfigLoader.from_file(config_path).resolve(strict=False)
        selection = PluginSelection.from_environment(
            plugins=(*core.plugins.load, *plugins),
            blocked=(*core.plugins.block, *blocked),
            autoload=False if no_autoload else core.plugins.autoload,
        )
        infos = make_plugin_manager(selection).describe()
    except SkulkError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps([
            {"name": i.name, "source": i.source, "distribution": i.distribution, "version": i.version, "target": i.target, "hooks": list(i.hooks)}
            for i in infos
        ], indent=2))
        return
    rows = [("NAME", "SOURCE", "DISTRIBUTION", "VERSION", "HOOKS")]
    rows += [(i.name, i.source, i.distribution or "-", i.version or "-", ", ".join(h.removeprefix("skulk_") for h in i.hooks)) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row[:4])) + "  " + row[4])


@cli.command(name="config")
@plugin_options
def config_command(config_path: str | None, plugins: tuple[str, ...], blocked: tuple[str, ...], no_autoload: bool | None) -> None:
    """Print the configuration this node would run with (file, overrides and environment applied)."""
    import attrs
    import yaml

    from skulk_core.config import ConfigLoader
    from skulk_core.node import build_node

    try:
        node = build_node(ConfigLoader.from_file(config_path), plugins=plugins, blocked=blocked, autoload=False if no_autoload else None)
    except SkulkError as exc:
        raise click.ClickException(str(exc)) from None
    config = node.config

    def shown(section: Any) -> dict[str, Any]:
        # A secret is a field declared ``repr=False`` (api.key, cluster.key, a plugin's token): never print it.
        values = attrs.asdict(section)
        for attribute in attrs.fields(type(section)):
            if not attribute.repr and values.get(attribute.name) is not None:
                values[attribute.name] = "***"
        return values

    doc: dict[str, Any] = {name: shown(getattr(config, name)) for name in ("node", "api", "plugins", "serve", "cluster", "transport", "telemetry")}
    doc.update({name: shown(value) for name, value in config.extra.items() if attrs.has(type(value))})
    click.echo(f"# node {node.node_id}; file: {config.source or 'none'}")
    click.echo(yaml.safe_dump(doc, sort_keys=False).rstrip())


def _api_call(api_url: str, method: str, path: str, api_key: str | None, body: object = None, timeout: float = 30) -> Any:
    """Call a node's HTTP API; a ClickException with the node's error message on failure."""
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api_url.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = str(exc)
        raise click.ClickException(f"{method} {path} failed ({exc.code}): {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise click.ClickException(f"cannot reach {api_url}{path}: {exc}") from None


def api_options(func: Any) -> Any:
    func = click.option("--api-key", default=None, envvar="SKULK_API_KEY", help="Bearer key, if the node requires one.")(func)
    func = click.option("--api", "api_url", default="http://127.0.0.1:52415", show_default=True, envvar="SKULK_API_URL", help="Any node's HTTP API.")(func)
    return func


@cli.command()
@api_options
@click.argument("model")
@click.option("--nodes", "min_nodes", type=int, default=1, show_default=True, help="Spread the model over at least N nodes.")
@click.option("--backend", default=None, help="Backend for every stage [default: the first that supports the model].")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the instance is ready.")
def place(api_url: str, api_key: str | None, model: str, min_nodes: int, backend: str | None, wait: bool) -> None:
    """Ask the cluster to place MODEL (an id or a GGUF path every stage node can read)."""
    import time as _time

    placed = _api_call(api_url, "POST", "/place_instance", api_key, {"model": model, "min_nodes": min_nodes, "backend": backend})
    instance_id = placed["instance_id"]
    click.echo(f"instance {instance_id}: " + ", ".join(f"{s['node_id']}[{s['layers'][0]}:{s['layers'][1]}] {s['backend']}" for s in placed.get("stages", [])))
    while wait:
        found = _api_call(api_url, "GET", f"/instance/{instance_id}", api_key)
        if found["status"] in ("ready", "failed"):
            click.echo(f"instance {instance_id} is {found['status']}")
            if found["status"] == "failed":
                raise click.ClickException("; ".join(s["status"] for s in found["stages"] if s["status"].startswith("failed")))
            break
        _time.sleep(0.5)


def _backend_label(name: str, site: dict | None) -> str:
    """A backend's name, with the device its stages would use and the memory free there, if not system memory."""
    return name if not site else f"{name}@{site['device']}({site['memory_available'] / 2**30:.1f}GiB)"


@cli.command()
@api_options
@click.option("--json", "as_json", is_flag=True, help="Print the raw /state document.")
def status(api_url: str, api_key: str | None, as_json: bool) -> None:
    """Show the cluster as a node sees it: master, nodes and instances."""
    state = _api_call(api_url, "GET", "/state", api_key)
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    click.echo(f"master {state['master_id'] or '-'}  round {state['election_round']}  event {state['index']}  (as seen by {state['node_id']})")
    rows = [("NODE", "NAME", "ROLE", "MEMORY FREE/TOTAL", "CPUS", "BACKENDS", "LAST SEEN")]
    import time as _time

    for n in state["nodes"]:
        r = n["resources"]
        seen = "-" if n["last_seen"] is None else f"{max(0.0, _time.time() - n['last_seen']):.1f}s ago"
        rows.append((
            n["node_id"], n["name"], "master" if n["is_master"] else "worker",
            f"{r['memory_available'] / 2**30:.1f}/{r['memory_total'] / 2**30:.1f} GiB", str(r["cpu_count"]),
            ",".join(_backend_label(b, r.get("sites", {}).get(b)) for b in r["backends"]) or "-", seen,
        ))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
    for inst in state["instances"]:
        stages = ", ".join(f"{s['node_id']}[{s['layers'][0]}:{s['layers'][1]}] {s['status']}" for s in inst["stages"])
        click.echo(f"instance {inst['instance_id']} {inst['model']} {inst['status']}: {stages}")


def _use_uvloop(choice: str) -> bool:
    """``node.event_loop``: uvloop runs the node's event loop for less CPU than asyncio's own (on the
    default model on two cores, 258-266 against 305-320 us of the loop's CPU per streamed token)."""
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise click.ClickException("node.event_loop is uvloop, but uvloop is not installed: pip install uvloop") from None
        return False
    return True


def main() -> None:
    cli(prog_name="skulk")


if __name__ == "__main__":
    main()
