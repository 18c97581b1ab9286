"""The builtin memory-weighted pipeline placement, with a fake backend (tests/fakes/fake_backend.py)
that sizes a shard as exactly one GiB per layer of the test card."""

from __future__ import annotations

import random
from pathlib import Path

import attrs
import pytest

from skulk_core import (
    BackendSite,
    ModelCard,
    ModelSource,
    NodeResources,
    NodeView,
    Placement,
    PlacementError,
    PlacementRequest,
    ShardRange,
    StageAssignment,
)
from skulk_core.builtin.placement import SAFETY_MARGIN, head_blocks, split_layers, split_work
from skulk_core.model import default_model_path
from skulk_core.plugins import PluginSelection, make_plugin_manager

GIB = 1024**3
FAKES = Path(__file__).parent / "fakes"


def make_card(n_layers: int = 30, gib_per_layer: int = 1, vocab_size: int = 1024) -> ModelCard:
    """A card whose output head is negligible work (a 1024-token vocabulary) unless asked otherwise,
    so splits follow memory alone."""
    return ModelCard(
        id="fake-model",
        architecture="llama",
        n_layers=n_layers,
        hidden_size=576,
        n_heads=9,
        n_kv_heads=3,
        context_length=2048,
        vocab_size=vocab_size,
        bytes_on_disk=n_layers * gib_per_layer * GIB,
        source=ModelSource(kind="local", path="/nonexistent/fake-model.gguf"),
        backends=("fake",),
    )


def make_node(node_id: str, usable_gib: float, *, limit_gib: float | None = None, backends=("fake", "fake-whole"), excluded=False) -> NodeView:
    available = int(usable_gib * GIB)
    return NodeView(
        node_id=node_id,
        name=f"host-{node_id}",
        resources=NodeResources(
            memory_total=available * 2,
            memory_available=available,
            cpu_count=2,
            memory_limit=None if limit_gib is None else int(limit_gib * GIB),
            backends=backends,
        ),
        excluded=excluded,
    )


def fits(gib: float) -> float:
    """Usable memory that holds ``gib`` GiB once the safety margin is taken off."""
    return gib / (1 - SAFETY_MARGIN) + 0.01


@pytest.fixture
def plugins():
    return make_plugin_manager(PluginSelection(plugins=[str(FAKES / "fake_backend.py")], autoload=False))


def place(plugins, nodes, settings=None, **request):
    card = request.pop("card", None) or make_card()
    return plugins.place(card, nodes, PlacementRequest(model_id=card.id, **request), settings)


def layers(placement: Placement) -> list[tuple[str, int]]:
    return [(s.node_id, s.shard.layer_count) for s in placement.stages]


# -- split_layers ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_split_layers_properties(seed: int):
    rng = random.Random(seed)
    n_layers = rng.randint(1, 80)
    weights = [rng.randint(0, 64 * GIB) for _ in range(rng.randint(1, n_layers))]
    ranges = split_layers(n_layers, weights)
    assert len(ranges) == len(weights)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))  # contiguous
    shares = [end - start for start, end in ranges]
    assert all(share >= 1 for share in shares)
    # proportional: one layer each, then the rest within one layer of its exact share
    spare = n_layers - len(weights)
    total = sum(max(w, 1) for w in weights)
    for share, weight in zip(shares, weights):
        assert abs((share - 1) - spare * max(weight, 1) / total) < 1
    assert split_layers(n_layers, weights) == ranges  # deterministic


def test_split_layers_examples():
    assert split_layers(30, [1]) == [(0, 30)]
    assert split_layers(30, [1, 1]) == [(0, 15), (15, 30)]
    assert split_layers(30, [2, 1]) == [(0, 20), (20, 30)]
    assert split_layers(3, [100, 1, 1]) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="cannot split 2 layers over 3 nodes"):
        split_layers(2, [1, 1, 1])


@pytest.mark.parametrize("seed", range(20))
def test_split_work_properties(seed: int):
    rng = random.Random(seed)
    n_layers = rng.randint(1, 80)
    weights = [rng.randint(0, 64 * GIB) for _ in range(rng.randint(1, n_layers))]
    head = rng.choice([0.5, 2.4, 8.0, 40.0])  # (0 is split_layers, tested above)
    ranges = split_work(n_layers, head, weights)
    assert len(ranges) == len(weights)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))
    assert all(end - start >= 1 for start, end in ranges)
    assert split_work(n_layers, head, weights) == ranges  # deterministic
    # every range but the last ends at its share of the work (layers + head), unless the one-layer
    # minimum of the ranges around it moved it
    total, cumulative = sum(max(w, 1) for w in weights), 0
    for index, (weight, (start, end)) in enumerate(zip(weights[:-1], ranges[:-1])):
        cumulative += max(weight, 1)
        target = (n_layers + head) * cumulative / total
        clamped = end in (start + 1, n_layers - (len(weights) - 1 - index))
        assert abs(end - target) <= 0.5 or clamped


def test_split_work_examples():
    assert split_work(30, 8.0, [1, 1]) == [(0, 19), (19, 30)]  # SmolLM2-135M: 19 blocks vs 11 + head
    assert split_work(30, 8.0, [1, 1, 1]) == [(0, 13), (13, 25), (25, 30)]
    assert split_work(30, 0.0, [1, 1]) == split_layers(30, [1, 1])
    assert split_work(30, 100.0, [1, 1]) == [(0, 29), (29, 30)]  # the head alone outweighs the blocks
    assert split_work(3, 8.0, [1, 1, 1]) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="cannot split 2 layers over 3 nodes"):
        split_work(2, 1.0, [1, 1, 1])


def test_the_default_models_head_counts_as_eight_blocks_of_macs_and_six_of_torch_time():
    card = ModelCard.from_gguf(default_model_path())
    assert head_blocks(card) == pytest.approx(8.0)  # 49152 x 576 against 576 x (576 + 192) x 2 + 3 x 576 x 1536
    assert head_blocks(card, block_overhead=1 / 3) == pytest.approx(6.0)  # blocks cost a third more than their MACs
    assert split_work(30, head_blocks(card, 1 / 3), [1, 1]) == [(0, 18), (18, 30)]
    assert split_work(30, head_blocks(card, 1 / 3), [1, 1, 1]) == [(0, 12), (12, 24), (24, 30)]


def test_placement_weighs_the_head_by_the_backends_block_overhead(plugins):
    card = make_card(vocab_size=49152)  # the head: about 5.8 blocks of MACs
    nodes = [make_node(n, fits(40), backends=("fake-slow-blocks",)) for n in ("a", "b")]
    # blocks that cost twice their MACs make the head worth about 2.9 of them, not 5.8: 16 / 14 + head
    # (against 18 / 12 + head on the plain fake backend)
    assert layers(place(plugins, nodes, card=card, min_nodes=2, backend="fake-slow-blocks")) == [("a", 16), ("b", 14)]


def test_equal_nodes_share_the_work_of_a_big_vocabulary_model(plugins):
    card = make_card(vocab_size=49152)  # the head: about 5.8 blocks of this card's shape
    nodes = [make_node("a", fits(40)), make_node("b", fits(40))]
    assert layers(place(plugins, nodes, card=card, min_nodes=2)) == [("a", 18), ("b", 12)]


def test_the_layer_split_is_used_when_the_balanced_one_overfills_a_node(plugins):
    card = make_card(vocab_size=49152)
    # 18 layers (18 GiB) do not fit a 16 GiB node, 15 do: the plain memory split is used
    nodes = [make_node("a", fits(16)), make_node("b", fits(16))]
    assert layers(place(plugins, nodes, card=card)) == [("a", 15), ("b", 15)]


def test_shard_range_and_placement_invariants():
    assert ShardRange.whole(30).is_whole
    shard = ShardRange(10, 20, 30)
    assert (shard.is_first, shard.is_last, shard.layer_count) == (False, False, 10)
    with pytest.raises(ValueError, match="invalid layer range"):
        ShardRange(5, 5, 30)
    with pytest.raises(ValueError, match="do not tile"):
        Placement("i", "m", [StageAssignment("a", ShardRange(0, 10, 30), "fake"), StageAssignment("b", ShardRange(11, 30, 30), "fake")])
    with pytest.raises(ValueError, match="does not end"):
        Placement("i", "m", [StageAssignment("a", ShardRange(0, 10, 30), "fake")])


# -- memory-weighted placement ---------------------------------------------------------------


def test_one_node_that_fits_takes_the_whole_model(plugins):
    placement = place(plugins, [make_node("small", fits(10)), make_node("big", fits(31)), make_node("mid", fits(20))])
    assert layers(placement) == [("big", 30)]
    assert placement.stages[0].shard.is_whole and placement.stages[0].backend == "fake"
    assert placement.model_id == "fake-model" and placement.kind == "pipeline"


def test_fewest_nodes_that_fit(plugins):
    nodes = [make_node("a", fits(12)), make_node("b", fits(24)), make_node("c", fits(12)), make_node("d", fits(4))]
    placement = place(plugins, nodes)
    # b alone cannot hold 30 GiB; b and one 12 GiB node can, split 2:1 by memory
    assert layers(placement) == [("b", 20), ("a", 10)]
    assert [(s.shard.start, s.shard.end) for s in placement.stages] == [(0, 20), (20, 30)]


def test_min_nodes_spreads_the_model(plugins):
    nodes = [make_node("a", fits(40)), make_node("b", fits(40)), make_node("c", fits(40))]
    assert layers(place(plugins, nodes)) == [("a", 30)]
    assert layers(place(plugins, nodes, min_nodes=3)) == [("a", 10), ("b", 10), ("c", 10)]


def test_memory_limit_caps_a_node(plugins):
    nodes = [make_node("huge-but-capped", 100, limit_gib=fits(10)), make_node("b", fits(21))]
    # the capped node counts as 10 GiB, so b (bigger) goes first and each is given by its share
    placement = place(plugins, nodes)
    assert [n for n, _ in layers(placement)] == ["b", "huge-but-capped"]
    assert layers(placement)[1][1] <= 10


def test_excluded_nodes_are_never_used(plugins):
    nodes = [make_node("excluded", fits(100), excluded=True), make_node("asked-away", fits(100)), make_node("ok", fits(31))]
    assert layers(place(plugins, nodes, exclude_nodes={"asked-away"})) == [("ok", 30)]


def test_nodes_without_the_backend_are_skipped(plugins):
    nodes = [make_node("no-fake", fits(100), backends=("fake-whole",)), make_node("ok", fits(31))]
    assert layers(place(plugins, nodes, backend="fake")) == [("ok", 30)]


def test_placement_error_states_needed_and_available_memory(plugins):
    nodes = [make_node("a", 10), make_node("b", 10)]
    with pytest.raises(PlacementError) as info:
        place(plugins, nodes)
    message = str(info.value)
    assert message.startswith("nothing can hold fake-model (30.00 GiB on disk): ")
    have = f"{10 * (1 - SAFETY_MARGIN):.2f} GiB"
    assert f"1 node(s): host-a (a) needs 30.00 GiB for layers 0-29, has {have}" in message
    assert f"2 node(s): host-a (a) needs 15.00 GiB for layers 0-14, has {have}" in message
    assert f"host-b (b) needs 15.00 GiB for layers 15-29, has {have}" in message


def test_placement_error_when_no_node_runs_the_backend(plugins):
    with pytest.raises(PlacementError, match="no backend can run fake-model: fake: no live node runs it"):
        place(plugins, [make_node("a", 100, backends=())], backend="fake")
    with pytest.raises(PlacementError, match=r"nope: not installed \(registered backends: fake, fake-whole, fake-slow-blocks, fake-gpu\)"):
        place(plugins, [make_node("a", 100)], backend="nope")


def test_whole_model_backend_uses_one_node(plugins):
    nodes = [make_node("a", fits(40)), make_node("b", fits(40))]
    assert layers(place(plugins, nodes, backend="fake-whole")) == [("a", 30)]
    with pytest.raises(PlacementError, match="2 node.s. requested but fake-whole cannot split a model into layer ranges"):
        place(plugins, nodes, backend="fake-whole", min_nodes=2)


def test_too_few_nodes_for_min_nodes(plugins):
    with pytest.raises(PlacementError, match=r"3 node\(s\) requested but only 2 eligible node\(s\)"):
        place(plugins, [make_node("a", 100), make_node("b", 100)], min_nodes=3)


def test_previews_list_every_node_count(plugins):
    card = make_card()
    nodes = [make_node("a", fits(20)), make_node("b", fits(20))]
    previews = plugins.placement_previews(card, nodes, PlacementRequest(model_id=card.id))
    assert len(previews) == 2
    assert previews[0].placement is None and "needs 30.00 GiB" in previews[0].reason
    assert previews[1].reason is None and layers(previews[1].placement) == [("a", 15), ("b", 15)]


def test_a_placement_plugin_takes_precedence_and_none_defers(write_plugin):
    chooser = write_plugin("always_last_node", """
        from skulk_core import Placement, ShardRange, StageAssignment, hookimpl

        @hookimpl
        def skulk_place(card, nodes, request, backends):
            if request.backend == "defer":
                return None
            node = nodes[-1]
            return Placement("custom", card.id, [StageAssignment(node.node_id, ShardRange.whole(card.n_layers), "fake")])
    """)
    plugins = make_plugin_manager(PluginSelection(plugins=[str(FAKES / "fake_backend.py"), str(chooser)], autoload=False))
    nodes = [make_node("big", fits(31)), make_node("tiny", 1)]
    assert layers(place(plugins, nodes)) == [("tiny", 30)]
    # returning None hands over to the builtin, which runs last
    with pytest.raises(PlacementError, match="defer: not installed"):
        place(plugins, nodes, backend="defer")


# -- stages on a GPU ---------------------------------------------------------------------------


def on_gpu(node: NodeView, gpu_gib: float, backend: str = "fake", device: str = "cuda:0") -> NodeView:
    """``node`` reporting that ``backend``'s stages would live on a GPU with ``gpu_gib`` free."""
    sites = {backend: BackendSite(device, int(gpu_gib * GIB))}
    return attrs.evolve(node, resources=attrs.evolve(node.resources, sites=sites))


def test_a_stage_on_a_gpu_is_sized_by_the_gpus_memory(plugins):
    """A node's 64 GiB of system memory do not count for a backend whose stages live on its GPU:
    the GPU's free memory does, and the estimate is asked for that device (the fake halves it)."""
    big_ram_small_gpu = on_gpu(make_node("a", 64), 8)
    assert big_ram_small_gpu.resources.usable_for("fake") == 8 * GIB
    assert big_ram_small_gpu.resources.usable_for("fake-whole") == 64 * GIB  # another backend: system memory
    assert big_ram_small_gpu.resources.device_for("fake") == "cuda:0"
    with pytest.raises(PlacementError, match=r"host-a \(a\) needs 15\.00 GiB for layers 0-29, has 7\.60 GiB"):
        place(plugins, [big_ram_small_gpu], min_nodes=1, max_nodes=1)
    # Two such GPUs hold the 30 layers at half a GiB each; sized by system memory at a GiB each,
    # one node's 64 GiB would have taken the whole model.
    two = [on_gpu(make_node("a", 64), fits(8)), on_gpu(make_node("b", 64), fits(8))]
    assert layers(place(plugins, two)) == [("a", 15), ("b", 15)]
    # --memory-limit caps a GPU's share too
    capped = on_gpu(make_node("a", 64, limit_gib=4), 8)
    assert capped.resources.usable_for("fake") == 4 * GIB


def test_sites_travel_in_the_cluster_state():
    """A node's sites reach the other nodes in its heartbeats (cattrs, the wire's converter)."""
    from skulk_core.cluster.messages import Heartbeat
    from skulk_core.wire import decode, encode

    beat = Heartbeat("a", 1.0, 1, None, False, False, on_gpu(make_node("a", 64), 8).resources, 0)
    assert decode(encode(beat)) == beat
    assert decode(encode(beat)).resources.sites["fake"] == BackendSite("cuda:0", 8 * GIB)  # type: ignore[attr-defined]


def test_resources_with_sites_stay_hashable():
    a, b = (on_gpu(make_node("a", 64), 8).resources for _ in range(2))
    assert a == b and hash(a) == hash(b) and a != make_node("a", 64).resources


def test_a_gpu_node_gets_the_layers_it_can_hold_not_its_bytes_share(plugins):
    """Beside a CPU node, a GPU holding half-precision weights (the fake halves a stage on CUDA)
    counts for twice its bytes: splits and the choice of nodes follow the layers each can hold."""
    cpu, gpu = make_node("cpu", fits(18)), on_gpu(make_node("gpu", 64), fits(8))
    # By bytes (18 against 8 GiB) the CPU node would get 21 of 30 layers, 3 more than it holds, and
    # the model would not fit on the two; by layers held (18 against 16) it gets 16, the GPU 14.
    assert layers(place(plugins, [cpu, gpu])) == [("cpu", 16), ("gpu", 14)]
    # The fewest nodes: a GPU of 10 GiB holds all 20 layers of a model that 15 GiB of CPU memory does
    # not, so it is chosen alone although it has fewer bytes.
    small_gpu, bigger_cpu = on_gpu(make_node("g", 64), fits(10)), make_node("c", fits(15))
    assert layers(place(plugins, [bigger_cpu, small_gpu], card=make_card(n_layers=20))) == [("g", 20)]
    # Nodes on the same device split as before, by memory.
    assert layers(place(plugins, [make_node("a", fits(20)), make_node("b", fits(10))])) == [("a", 20), ("b", 10)]


def test_stages_are_sized_with_the_backends_settings(plugins):
    """The placing node's config section for the backend reaches estimate_memory: a backend that
    holds quantized weights (the fake's ``divide``) fits the model on fewer nodes."""
    nodes = [make_node("a", fits(15)), make_node("b", fits(15))]
    assert layers(place(plugins, nodes)) == [("a", 15), ("b", 15)]
    assert layers(place(plugins, nodes, settings={"fake": {"divide": 2}})) == [("a", 30)]
    assert layers(place(plugins, nodes, settings={"other": {"divide": 2}})) == [("a", 15), ("b", 15)]  # another backend's
    card = make_card()
    previews = plugins.placement_previews(card, nodes, PlacementRequest(model_id=card.id), {"fake": {"divide": 2}})
    assert previews[0].placement is not None and len(previews[0].placement.stages) == 1
