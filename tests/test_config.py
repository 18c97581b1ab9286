"""skulk.yaml, SKULK_* variables and options: errors that name the key and the file, node_overrides,
precedence, plugin sections and environment parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from skulk_core import ConfigError, parse_size
from skulk_core.config import ConfigLoader
from skulk_core.node import build_node

RECORDER = str(Path(__file__).parent / "fakes" / "recorder.py")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "skulk.yaml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, **kwargs):
    kwargs.setdefault("env", {})
    return ConfigLoader.from_file(write_config(tmp_path, text), **kwargs).resolve()


# -- errors name the key and the file ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown keys
        ("api:\n  bogus: 1\n", "api: extra fields found (bogus)"),
        ("bogus:\n  a: 1\n", "unknown section 'bogus'"),
        # wrong types
        ("api:\n  port: eighty\n", "api.port: expected an integer, got 'eighty'"),
        ("plugins:\n  autoload: 'false'\n", "plugins.autoload: expected true or false, got 'false'"),
        ("cluster:\n  peers: host:52416\n", "cluster.peers: expected a list, got 'host:52416'"),
        ("node:\n  name: [a, b]\n", "node.name: expected a string"),
        ("cluster:\n  node_timeout: true\n", "cluster.node_timeout: expected a number, got True"),
        ("api: 5\n", "section 'api' must be a mapping, got int"),
        # bad values
        ("api:\n  port: 70000\n", "api: port must be a port number between 0 and 65535, got 70000"),
        ("node:\n  memory_limit: lots\n", "node: memory_limit: 'lots' is not a size"),
        ("node:\n  log_level: loud\n", "node: log_level must be one of debug, info, warning, error; got 'loud'"),
        ("serve:\n  max_sequences: 0\n", "serve: max_sequences must be at least 1, got 0"),
    ],
)
def test_config_errors_name_the_key_and_the_file(tmp_path: Path, text: str, expected: str):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        ConfigLoader.from_file(path, env={}).resolve()
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message


def test_not_yaml_and_not_a_mapping(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"skulk.yaml: not valid YAML"):
        load(tmp_path, "api: [unclosed\n")
    with pytest.raises(ConfigError, match=r"skulk.yaml: the top level must be a mapping of sections, got list"):
        load(tmp_path, "- api\n")


def test_explicit_config_file_must_exist(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        ConfigLoader.from_file(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="does not exist"):
        ConfigLoader.from_file(env={"SKULK_CONFIG": str(tmp_path / "nope.yaml")})


def test_skulk_config_names_the_file(tmp_path: Path):
    path = write_config(tmp_path, "api:\n  port: 1234\n")
    loader = ConfigLoader.from_file(env={"SKULK_CONFIG": str(path)})
    assert loader.source == path
    assert loader.resolve().api.port == 1234


def test_no_file_gives_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # no ./skulk.yaml here
    config = ConfigLoader.from_file(env={}).resolve()
    assert config.source is None
    assert (config.api.host, config.api.port) == ("127.0.0.1", 52415)
    assert (config.transport.name, config.transport.port) == ("tcp", 52416)
    assert config.data_dir == Path.home() / ".skulk"
    assert config.plugins.autoload is True and config.serve.min_nodes == 1


def test_empty_file_gives_the_defaults(tmp_path: Path):
    config = load(tmp_path, "")
    assert config.api.port == 52415 and config.source == tmp_path / "skulk.yaml"


# -- node_overrides --------------------------------------------------------------------------

OVERRIDES = """
api:
  port: 1000
node:
  name: from-file
node_overrides:
  box-a:
    api:
      port: 2000
  n0deid:
    api:
      port: 3000
    node:
      memory_limit: 4GiB
"""


def test_node_overrides_by_host_name(tmp_path: Path):
    config = load(tmp_path, OVERRIDES, hostname="box-a")
    assert config.api.port == 2000
    assert config.node.name == "from-file"  # merged key by key, not replaced
    assert load(tmp_path, OVERRIDES, hostname="box-b").api.port == 1000


def test_node_overrides_by_node_id_win_over_host_name(tmp_path: Path):
    loader = ConfigLoader.from_file(write_config(tmp_path, OVERRIDES), env={}, hostname="box-a")
    config = loader.resolve(node_id="n0deid")
    assert config.api.port == 3000
    assert config.node.memory_limit_bytes == 4 * 1024**3
    assert loader.resolve(node_id="someone-else").api.port == 2000


def test_node_overrides_are_validated_like_the_file(tmp_path: Path):
    path = write_config(tmp_path, "node_overrides:\n  box-a:\n    api:\n      colour: red\n")
    with pytest.raises(ConfigError, match=r"skulk.yaml: invalid configuration: api: extra fields found \(colour\)"):
        ConfigLoader.from_file(path, env={}, hostname="box-a").resolve()
    path = write_config(tmp_path, "node_overrides: [box-a]\n")
    with pytest.raises(ConfigError, match="node_overrides must map host names or node ids"):
        ConfigLoader.from_file(path, env={}).resolve()


def test_overriding_the_data_dir_by_node_id_is_refused(tmp_path: Path):
    from skulk_core.identity import NodeIdentity

    data_dir = tmp_path / "node"
    node_id = NodeIdentity.load_or_create(data_dir).node_id
    path = write_config(tmp_path, f"node:\n  data_dir: {data_dir}\nnode_overrides:\n  {node_id}:\n    node:\n      data_dir: {tmp_path / 'x'}\n")
    with pytest.raises(ConfigError, match="override it by host name"):
        build_node(ConfigLoader.from_file(path, env={}), autoload=False)


# -- precedence ------------------------------------------------------------------------------


def test_precedence_default_file_override_env_cli(tmp_path: Path):
    path = write_config(tmp_path, OVERRIDES)

    def port(**kwargs) -> int:
        kwargs.setdefault("env", {})
        return ConfigLoader.from_file(path, **kwargs).resolve().api.port

    assert ConfigLoader(env={}).resolve().api.port == 52415  # default
    assert port(hostname="elsewhere") == 1000  # file
    assert port(hostname="box-a") == 2000  # node override
    assert port(hostname="box-a", env={"SKULK_API_PORT": "4000"}) == 4000  # environment
    assert port(hostname="box-a", env={"SKULK_API_PORT": "4000"}, cli={"api": {"port": 5000}}) == 5000  # option
    # an option left unset (None) does not hide the layers below it
    assert port(hostname="box-a", cli={"api": {"port": None}}) == 2000


# -- environment -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("false", False), ("no", False), ("OFF", False), ("", False)],
)
def test_env_booleans(text: str, value: bool):
    assert ConfigLoader(env={"SKULK_PLUGINS_AUTOLOAD": text}).resolve().plugins.autoload is value


def test_env_bad_boolean_names_the_variable():
    with pytest.raises(ConfigError, match="environment variable SKULK_CLUSTER_DISCOVERY: 'maybe' is not a boolean"):
        ConfigLoader(env={"SKULK_CLUSTER_DISCOVERY": "maybe"}).resolve()


def test_env_lists_integers_and_optionals():
    config = ConfigLoader(
        env={
            "SKULK_CLUSTER_PEERS": "10.0.0.2:52416, 10.0.0.3:52416,",
            "SKULK_PLUGINS_LOAD": "",
            "SKULK_TRANSPORT_PORT": "6000",
            "SKULK_SERVE_THREADS": "",
            "SKULK_NODE_MEMORY_LIMIT": "512MB",
        }
    ).resolve()
    assert config.cluster.peers == ("10.0.0.2:52416", "10.0.0.3:52416")
    assert config.plugins.load == ()
    assert config.transport.port == 6000
    assert config.serve.threads is None
    assert config.node.memory_limit_bytes == 512 * 1000**2


def test_env_bad_integer_names_the_key():
    with pytest.raises(ConfigError, match="api.port: expected an integer, got 'lots'"):
        ConfigLoader(env={"SKULK_API_PORT": "lots"}).resolve()


def test_skulk_home_is_the_data_dir_and_the_specific_name_wins(tmp_path: Path):
    assert ConfigLoader(env={"SKULK_HOME": str(tmp_path / "a")}).resolve().data_dir == tmp_path / "a"
    both = {"SKULK_HOME": str(tmp_path / "a"), "SKULK_NODE_DATA_DIR": str(tmp_path / "b")}
    assert ConfigLoader(env=both).resolve().data_dir == tmp_path / "b"


def test_unrelated_skulk_variables_are_ignored():
    config = ConfigLoader(env={"SKULK_PLUGINS": "a,b", "SKULK_TRACE_PLUGINS": "1", "SKULK_API_COLOUR": "red"}).resolve()
    assert config.plugins.load == ()


def test_api_key_from_the_environment_is_not_in_the_repr():
    config = ConfigLoader(env={"SKULK_API_KEY": "s3cret"}).resolve()
    assert config.api.key == "s3cret"
    assert "s3cret" not in repr(config)


# -- plugin sections -------------------------------------------------------------------------

STORE_SECTION_PLUGIN = """
import attrs
from skulk_core import hookimpl


def _positive(instance, attribute, value):
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class FakeStoreSection:
    root: str = "/srv/models"
    max_models: int = attrs.field(default=4, validator=_positive)
    serve: bool = False
    mirrors: tuple[str, ...] = ()


@hookimpl
def skulk_config_sections(registry):
    registry.add("fakestore", FakeStoreSection)
"""


def test_plugin_section_defaults_file_and_env(tmp_path: Path, write_plugin):
    plugin = write_plugin("fakestore_plugin", STORE_SECTION_PLUGIN)
    node_dir = {"node": {"data_dir": str(tmp_path / "node")}}

    node = build_node(ConfigLoader(env={}, cli=node_dir), plugins=[str(plugin)], autoload=False)
    section = node.config.section("fakestore")
    assert (section.root, section.max_models, section.serve, section.mirrors) == ("/srv/models", 4, False, ())

    path = write_config(tmp_path, "fakestore:\n  root: /data\n  max_models: 2\n")
    env = {"SKULK_FAKESTORE_SERVE": "yes", "SKULK_FAKESTORE_MIRRORS": "a:1,b:2"}
    node = build_node(ConfigLoader.from_file(path, env=env, cli=node_dir), plugins=[str(plugin)], autoload=False)
    section = node.config.section("fakestore")
    assert (section.root, section.max_models, section.serve, section.mirrors) == ("/data", 2, True, ("a:1", "b:2"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fakestore:\n  max_models: 0\n", "fakestore: max_models must be at least 1, got 0"),
        ("fakestore:\n  max_models: many\n", "fakestore.max_models: expected an integer, got 'many'"),
        ("fakestore:\n  colour: red\n", "fakestore: extra fields found (colour)"),
    ],
)
def test_plugin_section_is_validated(tmp_path: Path, write_plugin, text: str, expected: str):
    plugin = write_plugin("fakestore_plugin", STORE_SECTION_PLUGIN)
    path = write_config(tmp_path, text)
    loader = ConfigLoader.from_file(path, env={}, cli={"node": {"data_dir": str(tmp_path / "node")}})
    with pytest.raises(ConfigError) as info:
        build_node(loader, plugins=[str(plugin)], autoload=False)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_plugin_section_without_its_plugin_is_an_unknown_section(tmp_path: Path):
    path = write_config(tmp_path, "fakestore:\n  root: /data\n")
    loader = ConfigLoader.from_file(path, env={}, cli={"node": {"data_dir": str(tmp_path / "node")}})
    with pytest.raises(ConfigError, match=r"unknown section 'fakestore'.*exists only while the plugin is loaded"):
        build_node(loader, autoload=False)


def test_plugin_cannot_claim_a_core_section(tmp_path: Path, write_plugin):
    plugin = write_plugin("greedy", """
        import attrs
        from skulk_core import hookimpl

        @hookimpl
        def skulk_config_sections(registry):
            registry.add("api", attrs.make_class("Api", {}))
    """)
    with pytest.raises(ConfigError, match="reserved config section 'api'"):
        build_node(ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}}), plugins=[str(plugin)], autoload=False)


def test_section_lookup_of_an_unloaded_plugin(tmp_path: Path):
    node = build_node(ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}}), plugins=[RECORDER], autoload=False)
    assert node.config.section("recorder").greeting == "hello"
    assert node.config.section("api") is node.config.api
    with pytest.raises(KeyError, match="is its plugin loaded"):
        node.config.section("nothing")


# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("1024", 1024), (2048, 2048), ("8GiB", 8 * 1024**3), ("512MB", 512 * 1000**2), ("1.5G", 1_500_000_000), ("10MiB", 10 * 1024**2), ("3k", 3000), ("7b", 7)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("eight gigs")


def test_engine_options_give_a_backends_section_back_as_its_class():
    import attrs

    from skulk_core import EngineOptions

    @attrs.frozen
    class Mine:
        depth: int = 2

    assert EngineOptions(16).settings_as(Mine, "mine") == Mine()
    assert EngineOptions(16, settings=Mine(5)).settings_as(Mine, "mine") == Mine(5)
    assert EngineOptions(16, settings={"depth": 7}).settings_as(Mine, "mine") == Mine(7)
    with pytest.raises(TypeError, match="mine settings must be a Mine or a mapping, got int"):
        EngineOptions(16, settings=3).settings_as(Mine, "mine")
