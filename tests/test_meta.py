"""Meta-tests: every hook is documented and called by a test; the docs cover every config key, CLI
option and testing fixture; the pytest plugin is registered through its entry point."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from pathlib import Path

import attrs
import click
import pytest

from skulk_core import hookspecs
from skulk_core.config import CORE_SECTIONS
from skulk_core.plugins import Plugins

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DOCS = REPO / "docs"
HOOKS = hookspecs.hook_names()


def test_there_are_hooks_to_check():
    # guards the checks below against passing on an empty list
    assert len(HOOKS) >= 15 and len(set(HOOKS)) == len(HOOKS)
    assert {"skulk_place", "skulk_event", "skulk_register_backends", "skulk_register_http"} <= set(HOOKS)


# -- docs/hooks.md: one section per hook -----------------------------------------------------


def hook_sections() -> dict[str, str]:
    """hook name -> the text of its section in docs/hooks.md (heading to the next heading)."""
    text = (DOCS / "hooks.md").read_text()
    headings = list(re.finditer(r"^(#{1,6}) (.*)$", text, re.MULTILINE))
    sections = {}
    for i, heading in enumerate(headings):
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        for name in re.findall(r"\bskulk_\w+\b", heading.group(2)):
            sections[name] = text[heading.start() : end]
    return sections


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docs_section(hook: str):
    sections = hook_sections()
    assert hook in sections, f"docs/hooks.md needs a section whose heading names {hook}"
    section = sections[hook]
    spec = getattr(hookspecs, next(cls.__name__ for cls in hookspecs.SPEC_CLASSES if hook in vars(cls)))
    function = getattr(spec, hook)
    for argument in inspect.signature(function).parameters:
        if argument != "self":
            assert argument in section, f"the {hook} section of docs/hooks.md does not mention its argument {argument!r}"
    firstresult = bool(function.skulk_spec["firstresult"])
    assert f"firstresult: {'yes' if firstresult else 'no'}" in section, f"the {hook} section must say 'firstresult: {'yes' if firstresult else 'no'}'"
    assert "@hookimpl" in section and f"def {hook}(" in section, f"the {hook} section needs a minimal @hookimpl example"


def test_docs_name_no_hook_that_does_not_exist():
    assert set(hook_sections()) <= set(HOOKS)


# -- every hook is called by a test ----------------------------------------------------------


def facade_methods() -> dict[str, set[str]]:
    """hook name -> the ``Plugins`` methods whose source calls it."""
    found: dict[str, set[str]] = {}
    for name, method in inspect.getmembers(Plugins, inspect.isfunction):
        if name.startswith("_"):
            continue
        for hook in re.findall(r"\b(skulk_\w+)\b", inspect.getsource(method)):
            found.setdefault(hook, set()).add(name)
    return found


def test_every_hook_has_a_facade_method():
    methods = facade_methods()
    missing = [hook for hook in HOOKS if hook not in methods]
    assert not missing, f"Plugins has no method that calls {missing}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_called_by_a_test(hook: str):
    methods = sorted(facade_methods()[hook])
    # a call through the facade (``plugins.place(``) or straight through pluggy (``hook.skulk_place(``)
    call = re.compile(rf"\.(?:{'|'.join(map(re.escape, methods))})\(|\bhook\.{hook}\(")
    test_files = [p for p in TESTS.rglob("test_*.py") if p.resolve() != Path(__file__).resolve()]
    assert len(test_files) >= 5
    callers = [p.name for p in test_files if call.search(p.read_text())]
    assert callers, f"no test calls {hook} (through Plugins.{' or Plugins.'.join(methods)})"


# -- the other references --------------------------------------------------------------------


def test_configuration_reference_covers_every_core_key():
    text = (DOCS / "configuration.md").read_text()
    for section, cls in CORE_SECTIONS.items():
        assert re.search(rf"^#+ `?{section}`?\b", text, re.MULTILINE), f"docs/configuration.md needs a section for {section}"
        for field in attrs.fields(cls):
            assert f"`{field.name}`" in text, f"docs/configuration.md does not document {section}.{field.name}"
            env = f"SKULK_{section}_{field.name}".upper()
            assert env in text, f"docs/configuration.md does not name the variable {env}"


def test_cli_reference_covers_every_command_and_option():
    from skulk_core.cli import cli

    text = (DOCS / "cli.md").read_text()
    for name, command in cli.commands.items():
        assert re.search(rf"^#+ `skulk {name}\b", text, re.MULTILINE), f"docs/cli.md needs a section for skulk {name}"
        for param in command.params:
            if isinstance(param, click.Option):
                for option in param.opts:
                    if option.startswith("--") and option != "--help":
                        assert option in text, f"docs/cli.md does not document skulk {name} {option}"


def test_plugin_guide_lists_every_testing_fixture():
    import skulk_core.testing as testing

    fixtures = [name for name, value in vars(testing).items() if hasattr(value, "_fixture_function_marker") or type(value).__name__ == "FixtureFunctionDefinition"]
    assert {"free_port", "skulk_plugins", "make_skulk_node", "skulk_node"} <= set(fixtures)
    text = (DOCS / "plugins.md").read_text()
    for name in fixtures:
        assert f"`{name}`" in text, f"docs/plugins.md does not describe the fixture {name}"


def test_docs_reference_the_example():
    assert (REPO / "examples" / "print_events.py").is_file()
    assert "examples/print_events.py" in (DOCS / "plugins.md").read_text()
    for page in ("architecture.md", "plugins.md", "hooks.md", "configuration.md", "cli.md", "http.md"):
        assert (DOCS / page).is_file(), page


# -- the pytest plugin -----------------------------------------------------------------------


def test_testing_plugin_is_registered_through_pytest11(pytestconfig: pytest.Config):
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="pytest11")}
    assert "skulk" in entry_points
    assert entry_points["skulk"].value == "skulk_core.testing"
    assert entry_points["skulk"].dist is not None and entry_points["skulk"].dist.name == "skulk"
    # and pytest loaded it from there (conftest.py does not import it)
    import skulk_core.testing

    assert pytestconfig.pluginmanager.get_plugin("skulk") is skulk_core.testing
