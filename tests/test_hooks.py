"""Every hook, called through the typed facade (``Plugins``), reaches a plugin's implementation with
the documented arguments; the recorder (tests/fakes/recorder.py) implements them all."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from skulk_core import (
    ClusterEvent,
    MetricSample,
    ModelCard,
    ModelSource,
    NodeResources,
    NodeView,
    PlacementRequest,
    TraceSpan,
)
from skulk_core.config import ConfigLoader
from skulk_core.hookspecs import hook_names
from skulk_core.node import build_node

FAKES = Path(__file__).parent / "fakes"


@pytest.fixture
def node(tmp_path: Path):
    loader = ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path / "node")}})
    return build_node(loader, plugins=[str(FAKES / "fake_backend.py"), str(FAKES / "recorder.py")], autoload=False)


@pytest.fixture
def calls(node):
    return node.plugins.pm.get_plugin("recorder").CALLS


def last_call(calls, hook: str) -> dict:
    return [kwargs for name, kwargs in calls if name == hook][-1]


CARD = ModelCard(
    id="recorded", architecture="llama", n_layers=4, hidden_size=64, n_heads=4, n_kv_heads=2,
    context_length=256, vocab_size=32, bytes_on_disk=4096, source=ModelSource(kind="local", path="/nonexistent"),
)
NODES = [NodeView("n1", "host-1", NodeResources(memory_total=2**34, memory_available=2**33, cpu_count=2, backends=("fake",)))]
REQUEST = PlacementRequest(model_id="recorded")


def test_every_hook_is_reached_through_the_facade(node, calls):
    plugins = node.plugins
    # build_node already asked for config sections: the recorder's section is in the config
    sections = plugins.config_sections()
    assert last_call(calls, "skulk_config_sections")["registry"] is sections
    assert sections.entry("recorder").plugin == "recorder" and sections.get("recorder").__name__ == "RecorderSection"
    assert node.config.section("recorder").greeting == "hello"

    transports = plugins.transports()
    assert transports.entry("recorder-transport").plugin == "recorder"
    assert last_call(calls, "skulk_register_transports")["registry"] is transports

    backends = plugins.backends()
    assert last_call(calls, "skulk_register_backends")["registry"] is backends
    assert backends.names() == ["fake", "fake-whole", "fake-slow-blocks", "fake-gpu"]
    assert plugins.backends() is backends  # registered once per plugin set

    placement = plugins.place(CARD, NODES, REQUEST)  # the recorder defers, the builtin places
    assert placement.node_ids == ("n1",)
    assert last_call(calls, "skulk_place") == {"card": CARD, "nodes": NODES, "request": REQUEST, "backends": backends}
    previews = plugins.placement_previews(CARD, NODES, REQUEST)
    assert [p.placement.node_ids for p in previews] == [("n1",)]
    assert last_call(calls, "skulk_placement_previews")["card"] is CARD

    assert plugins.find_model("recorded-ref", node) is None
    assert last_call(calls, "skulk_find_model") == {"ref": "recorded-ref", "node": node}
    resolver = plugins.model_resolver(CARD, node)
    assert resolver.source == "recorder"
    assert anyio.run(resolver.fetch).primary == node.data_dir / "recorded.gguf"
    assert last_call(calls, "skulk_model_resolver") == {"card": CARD, "node": node}
    assert "recorded" in [m.model_id for m in plugins.local_models(node)]
    assert last_call(calls, "skulk_local_models") == {"node": node}
    assert plugins.evict_model("recorded", node) is True
    assert plugins.evict_model("something-else", node) is False
    assert last_call(calls, "skulk_evict_model") == {"model_id": "something-else", "node": node}

    event = ClusterEvent(kind="test.event", node_id=node.node_id, attributes={"n": 1})
    plugins.event(event)
    assert last_call(calls, "skulk_event")["event"] is event
    span = TraceSpan(trace_id="t", span_id="s", name="decode", node_id=node.node_id, start=1.0, end=1.5)
    plugins.trace(span)
    assert last_call(calls, "skulk_trace")["span"] is span and span.duration == 0.5
    sample = MetricSample("skulk_tokens_generated_total", 3.0, kind="counter", labels={"model": "recorded"})
    plugins.metric(sample)
    assert last_call(calls, "skulk_metric")["sample"] is sample

    http = plugins.http(node)
    assert last_call(calls, "skulk_register_http") == {"registry": http, "node": node}
    services = plugins.services(node)
    assert last_call(calls, "skulk_register_services") == {"registry": services, "node": node}
    commands = plugins.commands()
    assert last_call(calls, "skulk_register_commands")["registry"] is commands

    assert {name for name, _ in calls} == set(hook_names())


def test_node_emit_reaches_telemetry(node, calls):
    event = node.emit("test.emitted", answer=42)
    assert last_call(calls, "skulk_event")["event"] is event
    assert (event.kind, event.node_id, dict(event.attributes)) == ("test.emitted", node.node_id, {"answer": 42})


def test_hook_specs_are_documented_in_code():
    from skulk_core import hookspecs

    for cls in hookspecs.SPEC_CLASSES:
        for name in vars(cls):
            if name.startswith("skulk_"):
                spec = getattr(cls, name)
                assert spec.__doc__ and len(spec.__doc__.strip()) > 40, name
                assert spec.__annotations__.get("return"), f"{name} has no return annotation"


def test_a_node_reports_where_backends_keep_their_stages(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``local_resources`` asks every backend that implements ``memory_site`` (with its config
    section) where its stages would live; a backend that cannot tell is sized by system memory."""
    from skulk_core import BackendSite
    from skulk_core.inference import local_resources

    def resources(section: object | None) -> NodeResources:
        loader = ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path / "node")}})
        node = build_node(loader, plugins=[str(FAKES / "fake_backend.py")], autoload=False)
        if section is not None:
            node.config.extra["fake-gpu"] = section
        return local_resources(node)

    here = resources(None)
    assert here.sites == {"fake-gpu": BackendSite("cuda:0", 2 * 1024**3)}
    assert here.usable_for("fake-gpu") == 2 * 1024**3 and here.usable_for("fake") == here.memory_available
    assert resources({"device": "cuda:1"}).sites == {"fake-gpu": BackendSite("cuda:1", 2 * 1024**3)}
    assert resources({"device": "cpu"}).sites == {}
    assert resources({"device": "broken"}).sites == {}
    assert "backend fake-gpu could not report where its stages live" in caplog.text
