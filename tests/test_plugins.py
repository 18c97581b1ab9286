"""The plugin manager: load order, the three forms of --plugin, blocking, SKULK_PLUGINS, load errors,
check_pending, duplicate names and hook tracing."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from skulk_core import DuplicateNameError, PluginError
from skulk_core.config import ConfigLoader
from skulk_core.node import build_node
from skulk_core.plugins import BUILTIN_PLUGINS, PluginSelection, make_plugin_manager
from skulk_core.telemetry import ClusterEvent

BUILTIN_NAMES = [name for name, _ in BUILTIN_PLUGINS]
SOURCE_RANK = {"builtin": 0, "entrypoint": 1, "module": 2, "file": 2}

# A telemetry plugin that records the events it sees, and the order plugins are called in.
EVENT_PLUGIN = """
from skulk_core import hookimpl

SEEN = []
ORDER = []

@hookimpl
def skulk_event(event):
    SEEN.append(event.kind)
    ORDER.append(__name__)
"""


@pytest.fixture
def two_entry_points(fake_distributions):
    """Two installed-looking plugins, ``fake-one`` and ``fake-two``, in two distributions."""
    fake_distributions.add("skulk-fake-one", "1.2.3", {"fake-one": "fake_one_plugin"}, {"fake_one_plugin": EVENT_PLUGIN})
    fake_distributions.add("skulk-fake-two", "0.0.1", {"fake-two": "fake_two_plugin"}, {"fake_two_plugin": EVENT_PLUGIN})
    return fake_distributions


def _event(kind: str = "test.happened") -> ClusterEvent:
    return ClusterEvent(kind=kind, node_id="test-node")


# -- load order ------------------------------------------------------------------------------


def test_builtins_load_in_their_declared_order(skulk_plugins):
    infos = skulk_plugins.describe()
    assert [i.name for i in infos] == BUILTIN_NAMES
    assert {i.source for i in infos} == {"builtin"}
    assert all(i.distribution == "skulk" and i.version for i in infos)
    http = next(i for i in infos if i.name == "http-core")
    assert http.hooks == ("skulk_register_http",)


def test_load_order_is_builtins_then_entry_points_then_explicit_plugins(two_entry_points, write_plugin):
    two_entry_points.add_module("explicit_module", EVENT_PLUGIN)
    path = write_plugin("explicit_file", EVENT_PLUGIN)
    plugins = make_plugin_manager(PluginSelection(plugins=["explicit_module", str(path)], blocked=["jsonlog"]))

    infos = plugins.describe()
    names = [i.name for i in infos]
    ranks = [SOURCE_RANK[i.source] for i in infos]
    assert ranks == sorted(ranks), f"builtins, then entry points, then --plugin: {names}"
    assert names[: len(BUILTIN_NAMES) - 1] == [n for n in BUILTIN_NAMES if n != "jsonlog"]
    assert "jsonlog" not in names  # blocked before the builtins were loaded
    assert names.index("fake-one") < names.index("explicit_module")
    assert names[-2:] == ["explicit_module", "explicit_file"]  # in the order they were named

    # pluggy calls the most recently registered implementation first: --plugin, then entry points
    plugins.event(_event())
    order = [plugins.pm.get_plugin(n).ORDER for n in ("explicit_file", "explicit_module", "fake-one")]
    assert [o[0] for o in order] == ["skulk_plugin_explicit_file", "explicit_module", "fake_one_plugin"]


def test_entry_point_plugins_are_described_with_their_distribution(two_entry_points):
    plugins = make_plugin_manager(PluginSelection())
    info = {i.name: i for i in plugins.describe()}["fake-one"]
    assert (info.source, info.distribution, info.version, info.target) == (
        "entrypoint", "skulk-fake-one", "1.2.3", "fake_one_plugin"
    )
    assert info.hooks == ("skulk_event",)
    plugins.event(_event("seen.by.entry.point"))
    assert plugins.pm.get_plugin("fake-one").SEEN == ["seen.by.entry.point"]


def test_no_autoload_loads_builtins_only(two_entry_points):
    plugins = make_plugin_manager(PluginSelection(autoload=False))
    assert plugins.names() == BUILTIN_NAMES


# -- --plugin in each of its three forms -----------------------------------------------------


def test_plugin_by_entry_point_name_loads_with_autoload_off(two_entry_points):
    plugins = make_plugin_manager(PluginSelection(plugins=["fake-two"], autoload=False))
    info = plugins.describe()[-1]
    assert (info.name, info.source, info.distribution) == ("fake-two", "entrypoint", "skulk-fake-two")
    assert "fake-one" not in plugins.names()


def test_plugin_by_module_path(fake_distributions):
    fake_distributions.add_module("my_skulk_module", EVENT_PLUGIN)
    plugins = make_plugin_manager(PluginSelection(plugins=["my_skulk_module"], autoload=False))
    info = plugins.describe()[-1]
    assert (info.name, info.source, info.target, info.hooks) == ("my_skulk_module", "module", "my_skulk_module", ("skulk_event",))
    plugins.event(_event())
    assert plugins.pm.get_plugin("my_skulk_module").SEEN == ["test.happened"]


def test_plugin_by_file_path(write_plugin):
    path = write_plugin("from_a_file", EVENT_PLUGIN)
    plugins = make_plugin_manager(PluginSelection(plugins=[str(path)], autoload=False))
    info = plugins.describe()[-1]
    assert (info.name, info.source, info.target) == ("from_a_file", "file", str(path.resolve()))
    plugins.event(_event())
    assert plugins.pm.get_plugin("from_a_file").SEEN == ["test.happened"]


def test_plugin_that_does_not_exist_says_what_plugin_takes(tmp_path: Path):
    with pytest.raises(PluginError, match="no entry point, module or file named 'no_such_plugin_anywhere'") as info:
        make_plugin_manager(PluginSelection(plugins=["no_such_plugin_anywhere"], autoload=False))
    assert info.value.plugin == "no_such_plugin_anywhere"
    with pytest.raises(PluginError, match="no plugin file at .*missing.py"):
        make_plugin_manager(PluginSelection(plugins=[str(tmp_path / "missing.py")], autoload=False))


# -- --no-plugin ---------------------------------------------------------------------------


def test_no_plugin_blocks_a_builtin_and_an_entry_point(two_entry_points):
    plugins = make_plugin_manager(PluginSelection(blocked=["jsonlog", "fake-one"]))
    names = plugins.names()
    assert "jsonlog" not in names and "fake-one" not in names
    assert "fake-two" in names and "http-core" in names
    assert plugins.pm.is_blocked("jsonlog") and plugins.pm.is_blocked("fake-one")


def test_plugin_wins_over_no_plugin(two_entry_points):
    plugins = make_plugin_manager(PluginSelection(plugins=["fake-one"], blocked=["fake-one"]))
    assert "fake-one" in plugins.names()


def test_config_file_load_and_block_lists(two_entry_points, write_plugin, tmp_path: Path):
    path = write_plugin("from_config", EVENT_PLUGIN)
    loader = ConfigLoader(
        document={"plugins": {"load": [str(path)], "block": ["fake-two", "jsonlog"]}},
        env={},
        cli={"node": {"data_dir": str(tmp_path / "node")}},
    )
    names = build_node(loader).plugins.names()
    assert "from_config" in names and "fake-one" in names
    assert "fake-two" not in names and "jsonlog" not in names
    # the command line adds to the config's lists
    names = build_node(loader, blocked=["fake-one"], plugins=["fake-two"]).plugins.names()
    assert "fake-one" not in names and "fake-two" in names


# -- SKULK_PLUGINS ---------------------------------------------------------------------------


def test_skulk_plugins_allowlist(two_entry_points, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SKULK_PLUGINS", "fake-two, not-installed")
    names = make_plugin_manager().names()
    assert "fake-two" in names and "fake-one" not in names
    assert names[: len(BUILTIN_NAMES)] == BUILTIN_NAMES  # builtins are not filtered

    monkeypatch.setenv("SKULK_PLUGINS", "fake-one,fake-two")
    names = make_plugin_manager().names()
    assert "fake-one" in names and "fake-two" in names


def test_empty_skulk_plugins_loads_no_entry_points(two_entry_points, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SKULK_PLUGINS", "")
    assert make_plugin_manager().names() == BUILTIN_NAMES
    # --plugin still loads what it names
    assert make_plugin_manager(PluginSelection.from_environment(plugins=["fake-one"])).names() == [*BUILTIN_NAMES, "fake-one"]


def test_unset_skulk_plugins_loads_every_entry_point(two_entry_points):
    selection = PluginSelection.from_environment()
    assert selection.allowlist is None
    names = make_plugin_manager(selection).names()
    assert "fake-one" in names and "fake-two" in names


# -- load errors -----------------------------------------------------------------------------

RAISES_ON_IMPORT = """
raise RuntimeError("this plugin is broken on purpose")
"""


def test_file_plugin_that_raises_on_import(write_plugin):
    path = write_plugin("broken_file", RAISES_ON_IMPORT)
    with pytest.raises(PluginError) as info:
        make_plugin_manager(PluginSelection(plugins=[str(path)], autoload=False))
    message = str(info.value)
    assert info.value.plugin == "broken_file"
    assert "plugin 'broken_file'" in message
    assert "RuntimeError: this plugin is broken on purpose" in message
    assert "--no-plugin broken_file" in message


def test_module_plugin_that_raises_on_import(fake_distributions):
    fake_distributions.add_module("broken_module", RAISES_ON_IMPORT)
    with pytest.raises(PluginError, match=r"plugin 'broken_module': failed to load broken_module: RuntimeError"):
        make_plugin_manager(PluginSelection(plugins=["broken_module"], autoload=False))


def test_module_plugin_missing_a_dependency_is_not_reported_as_missing_itself(fake_distributions):
    fake_distributions.add_module("needs_dep", "import needs_dep_that_is_not_installed\n")
    with pytest.raises(PluginError) as info:
        make_plugin_manager(PluginSelection(plugins=["needs_dep"], autoload=False))
    assert "No module named 'needs_dep_that_is_not_installed'" in str(info.value)
    assert "no entry point, module or file" not in str(info.value)


def test_entry_point_plugin_that_raises_on_import(fake_distributions):
    fake_distributions.add("skulk-broken", "0.1", {"broken-ep": "broken_ep_module"}, {"broken_ep_module": RAISES_ON_IMPORT})
    with pytest.raises(PluginError) as info:
        make_plugin_manager(PluginSelection())
    assert info.value.plugin == "broken-ep"
    assert "failed to load broken_ep_module" in str(info.value)
    assert "--no-plugin broken-ep" in str(info.value)
    # ... and the advice works
    assert "broken-ep" not in make_plugin_manager(PluginSelection(blocked=["broken-ep"])).names()


def test_misspelt_hook_fails_start_up_naming_the_plugin(write_plugin):
    path = write_plugin("typo_plugin", """
        from skulk_core import hookimpl

        @hookimpl
        def skulk_evnt(event):
            pass
    """)
    with pytest.raises(PluginError) as info:
        make_plugin_manager(PluginSelection(plugins=[str(path)], autoload=False))
    assert info.value.plugin == "typo_plugin"
    assert "skulk_evnt" in str(info.value)
    assert "skulk_event" in str(info.value)  # the known hooks are listed
    assert "docs/hooks.md" in str(info.value)


def test_misspelt_hook_argument_fails_naming_the_plugin(write_plugin):
    path = write_plugin("bad_argument", """
        from skulk_core import hookimpl

        @hookimpl
        def skulk_event(evnt):
            pass
    """)
    with pytest.raises(PluginError, match=r"(?s)plugin 'bad_argument'.*{'evnt'} are declared") as info:
        make_plugin_manager(PluginSelection(plugins=[str(path)], autoload=False))
    assert info.value.plugin == "bad_argument"


def test_two_plugins_with_one_name(tmp_path: Path, write_plugin):
    first = write_plugin("same_name", EVENT_PLUGIN)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    second = other_dir / "same_name.py"
    second.write_text(EVENT_PLUGIN)
    with pytest.raises(PluginError, match="plugin 'same_name': two plugins share this name") as info:
        make_plugin_manager(PluginSelection(plugins=[str(first), str(second)], autoload=False))
    assert str(first.resolve()) in str(info.value) and str(second.resolve()) in str(info.value)


# -- registries: duplicates and failures name the plugins ------------------------------------

BACKEND_PLUGIN = """
from skulk_core import hookimpl

@hookimpl
def skulk_register_backends(registry):
    registry.add("shared-name", object)
"""


def test_duplicate_backend_names_both_plugins(write_plugin):
    first = write_plugin("backend_a", BACKEND_PLUGIN)
    second = write_plugin("backend_b", BACKEND_PLUGIN)
    plugins = make_plugin_manager(PluginSelection(plugins=[str(first), str(second)], autoload=False))
    with pytest.raises(DuplicateNameError) as info:
        plugins.backends()
    error = info.value
    assert {error.first, error.second} == {"backend_a", "backend_b"}
    assert error.kind == "backend" and error.name == "shared-name"
    assert "plugin 'backend_a'" in str(error) and "plugin 'backend_b'" in str(error)
    assert "--no-plugin" in str(error)


def test_duplicate_http_route_names_the_builtin_and_the_plugin(write_plugin, tmp_path: Path):
    path = write_plugin("steals_health", """
        from skulk_core import hookimpl

        @hookimpl
        def skulk_register_http(registry, node):
            async def health(request):
                return None
            registry.route("GET", "/health", health)
    """)
    node = build_node(ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}}), plugins=[str(path)], autoload=False)
    with pytest.raises(DuplicateNameError, match=r"HTTP route 'GET /health' is registered by both") as info:
        node.plugins.http(node)
    assert {info.value.first, info.value.second} == {"http-core", "steals_health"}


def test_registry_refuses_an_empty_name(write_plugin):
    path = write_plugin("nameless", """
        from skulk_core import hookimpl

        @hookimpl
        def skulk_register_transports(registry):
            registry.add("", object)
    """)
    plugins = make_plugin_manager(PluginSelection(plugins=[str(path)], autoload=False))
    with pytest.raises(PluginError, match="plugin 'nameless': registered a transport with an empty"):
        plugins.transports()


def test_registration_hook_that_raises_names_the_plugin(write_plugin):
    path = write_plugin("explodes", """
        from skulk_core import hookimpl

        @hookimpl
        def skulk_register_commands(registry):
            raise KeyError("oops")
    """)
    plugins = make_plugin_manager(PluginSelection(plugins=[str(path)], autoload=False))
    with pytest.raises(PluginError, match=r"plugin 'explodes': skulk_register_commands raised KeyError\('oops'\)"):
        plugins.commands()


def test_a_failing_telemetry_plugin_never_breaks_the_caller(write_plugin, caplog: pytest.LogCaptureFixture):
    failing = write_plugin("failing_telemetry", """
        from skulk_core import hookimpl

        @hookimpl
        def skulk_metric(sample):
            raise RuntimeError("metrics are down")
    """)
    plugins = make_plugin_manager(PluginSelection(plugins=[str(failing)], autoload=False))
    from skulk_core import MetricSample

    with caplog.at_level(logging.ERROR, logger="skulk.plugins"):
        plugins.metric(MetricSample("skulk_test_total", 1.0, kind="counter"))
    assert "a telemetry plugin failed in skulk_metric" in caplog.text


# -- SKULK_TRACE_PLUGINS ---------------------------------------------------------------------


def test_trace_plugins_logs_every_hook_call(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setenv("SKULK_TRACE_PLUGINS", "1")
    with caplog.at_level(logging.INFO, logger="skulk.plugins"):
        plugins = make_plugin_manager(PluginSelection(autoload=False))
        plugins.event(_event())
    messages = [r.getMessage() for r in caplog.records if r.name == "skulk.plugins"]
    assert messages == ["hook skulk_event(event) -> ['jsonlog']"]


def test_trace_plugins_logs_registration_hooks(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path):
    monkeypatch.setenv("SKULK_TRACE_PLUGINS", "1")
    node = build_node(ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}}), autoload=False)
    with caplog.at_level(logging.INFO, logger="skulk.plugins"):
        node.plugins.http(node)
        node.plugins.services(node)
    messages = [r.getMessage() for r in caplog.records]
    assert "hook skulk_register_http -> http-core" in messages
    assert "hook skulk_register_services -> jsonlog" in messages


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_trace_plugins_off(value: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setenv("SKULK_TRACE_PLUGINS", value)
    with caplog.at_level(logging.INFO, logger="skulk.plugins"):
        make_plugin_manager(PluginSelection(autoload=False)).event(_event())
    assert caplog.records == []


# -- the example third-party plugin ----------------------------------------------------------


def test_example_print_events_plugin(capsys: pytest.CaptureFixture[str]):
    example = Path(__file__).resolve().parent.parent / "examples" / "print_events.py"
    plugins = make_plugin_manager(PluginSelection(plugins=[str(example)], autoload=False))
    info = plugins.describe()[-1]
    assert (info.name, info.source, info.hooks) == ("print_events", "file", ("skulk_event",))
    plugins.event(ClusterEvent(kind="peer.joined", node_id="abc", attributes={"peer": "def", "n": 2}))
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r'\[event\] \d\d:\d\d:\d\d peer\.joined node=abc peer="def" n=2', line), line
