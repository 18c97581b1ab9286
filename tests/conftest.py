"""Shared helpers for the core's tests: a clean environment, plugin files and a throwaway distribution.

The fixtures for plugin authors (``free_port``, ``skulk_plugins``, ``make_skulk_node``) come from
``skulk_core.testing``, which pytest loads through its ``pytest11`` entry point.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"


@pytest.fixture(autouse=True)
def _clean_skulk_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SKULK_* variable of the developer's shell leaks into a test, and no test touches ~/.skulk."""
    for name in list(os.environ):
        if name.startswith("SKULK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SKULK_HOME", str(tmp_path / "skulk-home"))


@pytest.fixture
def write_plugin(tmp_path: Path) -> Callable[[str, str], Path]:
    """``write_plugin("name", source)`` writes ``name.py`` (dedented) and returns its path."""
    folder = tmp_path / "plugin-files"
    folder.mkdir()

    def write(name: str, source: str) -> Path:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return write


class FakeDistribution:
    """A distribution that exists only as a ``.dist-info`` folder on ``sys.path``, so that
    ``importlib.metadata`` finds its ``skulk`` entry points as it would find an installed plugin's."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.modules: list[str] = []
        self._monkeypatch = monkeypatch
        root.mkdir()
        monkeypatch.syspath_prepend(str(root))

    def add_module(self, module: str, source: str) -> None:
        """A plain importable module on ``sys.path``, belonging to no distribution."""
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        self.modules.append(module)

    def add(self, dist_name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        info = self.root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        lines = ["[skulk]"] + [f"{name} = {target}" for name, target in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_distributions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDistribution]:
    dists = FakeDistribution(tmp_path / "site", monkeypatch)
    yield dists
    for module in dists.modules:
        sys.modules.pop(module, None)


BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def benchmark_script(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The script ``benchmarks/<name>.py`` (the test module's ``BENCHMARK``) loaded as a module,
    and unloaded after the module's tests, with serving.py, which it may import from its folder."""
    name = request.module.BENCHMARK
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs resolves a module's annotations through it
    path = list(sys.path)
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.modules.pop("serving", None)
    sys.path[:] = path
