"""The ``skulk`` command, run as a real process: --version, plugins, config, plugin commands, and
``skulk run`` started on loopback and stopped with SIGTERM or SIGINT."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import pytest
import yaml

import skulk_core
from skulk_core.plugins import BUILTIN_PLUGINS

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "print_events.py"
BUILTIN_NAMES = [name for name, _ in BUILTIN_PLUGINS]
_script = Path(sys.executable).parent / "skulk"
SKULK = [str(_script)] if _script.exists() else [sys.executable, "-m", "skulk_core"]


def skulk_env(**extra: str) -> dict[str, str]:
    """The test's environment (SKULK_* already cleaned by conftest), kept on loopback, serving nothing."""
    env = dict(os.environ)
    env.update(
        SKULK_SERVE_ENABLED="false",  # a bare node: these tests are about the runtime, not a model
        SKULK_TRANSPORT_HOST="127.0.0.1",
        SKULK_TRANSPORT_PORT="0",
        SKULK_CLUSTER_DISCOVERY="false",
    )
    env.update(extra)
    return env


def skulk(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*SKULK, *args], cwd=cwd, env=env or skulk_env(), capture_output=True, text=True, timeout=timeout)


# -- simple commands -------------------------------------------------------------------------


def test_version(tmp_path: Path):
    for flag in ("--version", "-V"):
        result = skulk(flag, cwd=tmp_path)
        assert (result.returncode, result.stdout) == (0, f"skulk {skulk_core.__version__}\n")


def test_help_lists_the_commands(tmp_path: Path):
    result = skulk("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("run", "plugins", "config"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), result.stdout
    run_help = skulk("run", "--help", cwd=tmp_path).stdout
    for option in ("--config", "--plugin", "--no-plugin", "--no-autoload", "--data-dir", "--node-name", "--api-host", "--api-port"):
        assert option in run_help


def test_plugins_table(tmp_path: Path):
    result = skulk("plugins", "--no-autoload", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "DISTRIBUTION", "VERSION", "HOOKS"]
    assert [line.split()[0] for line in lines[1:]] == BUILTIN_NAMES
    http_row = next(line for line in lines if line.startswith("http-core"))
    assert http_row.split()[1:] == ["builtin", "skulk", skulk_core.__version__, "register_http"]


def test_plugins_json_with_the_example_plugin(tmp_path: Path):
    result = skulk("plugins", "--json", "--no-autoload", "--plugin", str(EXAMPLE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    infos = json.loads(result.stdout)
    assert [i["name"] for i in infos] == [*BUILTIN_NAMES, "print_events"]
    example = infos[-1]
    assert example == {
        "name": "print_events",
        "source": "file",
        "distribution": None,
        "version": None,
        "target": str(EXAMPLE),
        "hooks": ["skulk_event"],
    }
    assert set(infos[0]) == {"name", "source", "distribution", "version", "target", "hooks"}


def test_plugins_with_a_misspelt_hook_fails(tmp_path: Path):
    typo = tmp_path / "typo.py"
    typo.write_text("from skulk_core import hookimpl\n\n@hookimpl\ndef skulk_evnt(event):\n    pass\n")
    result = skulk("plugins", "--no-autoload", "--plugin", str(typo), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: plugin 'typo': unknown hook 'skulk_evnt'")
    assert "Traceback" not in result.stderr


SECRET_SECTION_PLUGIN = """
import attrs
from skulk_core import hookimpl


@attrs.frozen
class VaultSection:
    url: str = "https://vault.invalid"
    token: str | None = attrs.field(default=None, repr=False)  # repr=False marks a secret


@hookimpl
def skulk_config_sections(registry):
    registry.add("vault", VaultSection)
"""


def test_config_shows_the_resolved_configuration(tmp_path: Path):
    (tmp_path / "skulk.yaml").write_text("api:\n  port: 1234\n  key: s3cret\nnode:\n  name: from-file\n")
    (tmp_path / "vault_plugin.py").write_text(SECRET_SECTION_PLUGIN)
    env = skulk_env(SKULK_NODE_NAME="from-env", SKULK_VAULT_TOKEN="t0ken")
    result = skulk("config", "--no-autoload", "--plugin", "vault_plugin.py", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    header, _, body = result.stdout.partition("\n")
    assert re.fullmatch(r"# node [a-z2-7]+; file: skulk.yaml", header), header
    doc = yaml.safe_load(body)
    assert doc["api"] == {"host": "127.0.0.1", "port": 1234, "key": "***"}
    assert doc["vault"] == {"url": "https://vault.invalid", "token": "***"}
    assert "s3cret" not in result.stdout and "t0ken" not in result.stdout  # secrets are never printed
    assert doc["node"]["name"] == "from-env"
    assert doc["node"]["data_dir"] == os.environ["SKULK_HOME"]
    assert doc["plugins"] == {"load": [], "block": [], "autoload": True}
    assert set(doc) >= {"node", "api", "plugins", "serve", "cluster", "transport", "telemetry", "vault"}


def test_config_error_names_the_file_and_the_key(tmp_path: Path):
    config = tmp_path / "elsewhere.yaml"
    config.write_text("api:\n  port: seventy\n")
    result = skulk("config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert f"Error: {config}: invalid configuration: api.port: expected an integer, got 'seventy'" in result.stderr
    result = skulk("config", cwd=tmp_path, env=skulk_env(SKULK_CONFIG=str(tmp_path / "missing.yaml")))
    assert result.returncode == 1 and "missing.yaml does not exist" in result.stderr


COMMAND_PLUGIN = """
import click
from skulk_core import hookimpl


@click.command()
@click.argument("name")
def hello(name):
    \"\"\"Say hello (a plugin's command).\"\"\"
    click.echo(f"hello {name} from a plugin")


@hookimpl
def skulk_register_commands(registry):
    registry.add("hello", hello)
"""


def test_plugin_commands(tmp_path: Path):
    (tmp_path / "hello_plugin.py").write_text(COMMAND_PLUGIN)
    (tmp_path / "skulk.yaml").write_text("plugins:\n  load: [hello_plugin.py]\n  autoload: false\n")
    result = skulk("hello", "fox", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "hello fox from a plugin\n"), result.stderr
    assert re.search(r"^\s+hello\s+Say hello", skulk("--help", cwd=tmp_path).stdout, re.MULTILINE)


def test_a_plugin_cannot_replace_a_builtin_command(tmp_path: Path):
    (tmp_path / "thief.py").write_text(COMMAND_PLUGIN.replace('registry.add("hello", hello)', 'registry.add("run", hello)'))
    (tmp_path / "skulk.yaml").write_text("plugins:\n  load: [thief.py]\n  autoload: false\n")
    result = skulk("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "warning: plugin commands unavailable: plugin 'thief' registers the command 'run', which is built in" in result.stderr


# -- skulk run -------------------------------------------------------------------------------


def test_run_options_set_their_config_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Every option of ``skulk run`` reaches the configuration (checked in-process, stopping just
    before the node is built)."""
    from click.testing import CliRunner

    import skulk_core.cli
    import skulk_core.node
    from skulk_core import SkulkError

    seen = {}

    def build_node_stub(loader, **kwargs):
        seen["config"], seen["kwargs"] = loader.resolve(), kwargs
        raise SkulkError("stopped before the node was built")

    monkeypatch.setattr(skulk_core.node, "build_node", build_node_stub)
    monkeypatch.setattr(skulk_core.cli, "_setup_logging", lambda level: None)
    monkeypatch.chdir(tmp_path)
    args = [
        "run", "--data-dir", str(tmp_path / "d"), "--node-name", "n1", "--api-host", "0.0.0.0", "--api-port", "1234",
        "--api-key", "k", "--model", "m.gguf", "--backend", "fake", "--min-nodes", "2", "--memory-limit", "4GiB",
        "--transport-host", "127.0.0.2", "--transport-port", "2345", "--peer", "a:1", "--peer", "b:2",
        "--no-discovery", "--discovery-port", "3456", "--force-master", "--log-level", "debug",
        "--plugin", "x.py", "--no-plugin", "jsonlog", "--no-autoload",
    ]
    result = CliRunner().invoke(skulk_core.cli.cli, args)
    assert result.exit_code == 1 and "stopped before the node was built" in result.output
    config = seen["config"]
    assert (config.node.data_dir, config.node.name, config.node.memory_limit, config.node.log_level) == (str(tmp_path / "d"), "n1", "4GiB", "debug")
    assert (config.api.host, config.api.port, config.api.key) == ("0.0.0.0", 1234, "k")
    assert (config.serve.model, config.serve.backend, config.serve.min_nodes) == ("m.gguf", "fake", 2)
    assert (config.transport.host, config.transport.port) == ("127.0.0.2", 2345)
    assert (config.cluster.discovery, config.cluster.discovery_port, config.cluster.force_master) == (False, 3456, True)
    assert seen["kwargs"] == {"plugins": ("x.py",), "blocked": ("jsonlog",), "autoload": False, "peers": ("a:1", "b:2")}

    # options left out leave the lower layers alone
    CliRunner().invoke(skulk_core.cli.cli, ["run"], env={"SKULK_CLUSTER_DISCOVERY": "false", "SKULK_API_PORT": "999"})
    assert seen["config"].cluster.discovery is False and seen["config"].api.port == 999
    assert seen["kwargs"] == {"plugins": (), "blocked": (), "autoload": None, "peers": ()}



class RunningNode:
    def __init__(self, process: subprocess.Popen, port: int, data_dir: Path, stdout: Path, stderr: Path) -> None:
        self.process, self.port, self.data_dir = process, port, data_dir
        self._stdout, self._stderr = stdout, stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()

    def events(self) -> list[dict]:
        log = self.data_dir / "logs" / "skulk.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def start_skulk_run(tmp_path: Path, free_port: int):
    processes: list[subprocess.Popen] = []

    def start(*extra: str, wait: bool = True, env: dict[str, str] | None = None) -> RunningNode:
        data_dir = tmp_path / "node"
        out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        args = [*SKULK, "run", "--data-dir", str(data_dir), "--api-host", "127.0.0.1", "--api-port", str(free_port), "--no-autoload", *extra]
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.Popen(args, cwd=tmp_path, env={**skulk_env(), **(env or {})}, stdout=stdout, stderr=stderr, text=True)
        processes.append(process)
        node = RunningNode(process, free_port, data_dir, out, err)
        if wait:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, f"skulk run exited with {process.returncode}:\n{node.stderr}"
                try:
                    if httpx.get(f"{node.url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"skulk run did not answer /health in 30 s:\n{node.stderr}"
                time.sleep(0.05)
        return node

    yield start
    for process in processes:  # a failed test must not leave a node behind
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.parametrize(
    ("signum", "loop"), [(signal.SIGTERM, "auto"), (signal.SIGINT, "asyncio")], ids=["SIGTERM-uvloop", "SIGINT-asyncio"]
)
def test_run_serves_then_stops_cleanly_on_a_signal(start_skulk_run, signum: int, loop: str):
    node = start_skulk_run(env={"SKULK_NODE_EVENT_LOOP": loop})
    assert f"event loop: {'uvloop' if loop == 'auto' else 'asyncio'}" in node.stderr  # uvloop is a dependency here
    health = httpx.get(f"{node.url}/health", timeout=5).json()
    assert health["status"] == "ok"
    assert httpx.get(f"{node.url}/node_id", timeout=5).json() == health["node_id"]
    assert f"ready: {node.url}" in node.stderr

    started = time.monotonic()
    node.process.send_signal(signum)
    assert node.process.wait(timeout=15) == 0, node.stderr
    assert time.monotonic() - started < 5, "shutdown took too long"
    kinds = [e["kind"] for e in node.events()]
    assert kinds[-1] == "node.stopped" and "node.stopping" in kinds, kinds
    assert f"received {signal.Signals(signum).name}, shutting down" in node.stderr
    assert "Traceback" not in node.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{node.url}/health", timeout=1)


def test_a_crash_in_native_code_leaves_every_threads_stack_in_the_log(start_skulk_run):
    # As llama.cpp's AMX kernels once did: a segmentation fault, which no Python code sees.
    node = start_skulk_run()
    node.process.send_signal(signal.SIGSEGV)
    assert node.process.wait(timeout=15) == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in node.stderr
    assert "Current thread" in node.stderr and "skulk_core/cli.py" in node.stderr, node.stderr[-2000:]


def test_run_with_the_example_plugin_prints_events(start_skulk_run):
    node = start_skulk_run("--plugin", str(EXAMPLE))
    node_id = httpx.get(f"{node.url}/node_id", timeout=5).json()
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(timeout=15) == 0, node.stderr
    lines = [line for line in node.stdout.splitlines() if line.startswith("[event] ")]
    kinds = [line.split()[2] for line in lines]
    assert "node.started" in kinds and kinds[-1] == "node.stopped", node.stdout
    assert all(f"node={node_id}" in line for line in lines)


def test_run_on_a_busy_port_fails_clearly(start_skulk_run, free_port: int):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port))
        busy.listen()
        node = start_skulk_run(wait=False)
        assert node.process.wait(timeout=30) == 1
    assert f"Error: cannot listen on 127.0.0.1:{free_port} for the HTTP API" in node.stderr
    assert "--api-port" in node.stderr and "Traceback" not in node.stderr


def test_run_with_a_service_that_fails_to_start(start_skulk_run, tmp_path: Path):
    plugin = tmp_path / "bad_service.py"
    plugin.write_text(
        "from skulk_core import hookimpl\n\n"
        "@hookimpl\n"
        "def skulk_register_services(registry, node):\n"
        "    async def service(node, *, task_status):\n"
        "        raise RuntimeError('cannot start')\n"
        "    registry.add('doomed', service)\n"
    )
    node = start_skulk_run("--plugin", str(plugin), wait=False)
    assert node.process.wait(timeout=30) == 1
    assert "Error: plugin 'bad_service': service 'doomed' failed to start: RuntimeError('cannot start')" in node.stderr
    assert "Traceback" not in node.stderr


def test_run_with_a_broken_plugin_names_it(start_skulk_run, tmp_path: Path):
    plugin = tmp_path / "broken.py"
    plugin.write_text("raise ImportError('a dependency is missing')\n")
    node = start_skulk_run("--plugin", str(plugin), wait=False)
    assert node.process.wait(timeout=30) == 1
    assert "Error: plugin 'broken': failed to load" in node.stderr and "--no-plugin broken" in node.stderr


def test_status_shows_where_a_backends_stages_would_live(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from skulk_core import cli

    node = {
        "node_id": "n1", "name": "gpu-box", "is_master": True, "last_seen": None,
        "resources": {
            "memory_available": 60 * 2**30, "memory_total": 64 * 2**30, "cpu_count": 16,
            "backends": ["llamacpp", "torch"],
            "sites": {"torch": {"device": "cuda:0", "memory_available": int(7.6 * 2**30)}},
        },
    }
    state = {"master_id": "n1", "election_round": 1, "index": 3, "node_id": "n1", "nodes": [node], "instances": []}
    monkeypatch.setattr(cli, "_api_call", lambda *args: state)
    out = CliRunner().invoke(cli.cli, ["status"]).output
    assert "llamacpp,torch@cuda:0(7.6GiB)" in out and "60.0/64.0 GiB" in out


def test_the_event_loop_choice_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    from skulk_core.cli import _use_uvloop

    assert _use_uvloop("auto") and _use_uvloop("uvloop") and not _use_uvloop("asyncio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert not _use_uvloop("auto")
    with pytest.raises(click.ClickException, match="uvloop is not installed"):
        _use_uvloop("uvloop")
