"""The replicated state's pure apply function, the wire codec, and the election's convergence."""

from __future__ import annotations

import random

import anyio
import msgpack
import pytest

from skulk_core.cluster.election import Candidate, Election, View, choose_candidate
from skulk_core.cluster.messages import Heartbeat, Snapshot
from skulk_core.cluster.state import (
    ClusterState,
    InstancePlaced,
    InstanceRecord,
    InstanceRemoved,
    LogEntry,
    MasterChanged,
    NodeJoined,
    NodeLeft,
    NodeRecord,
    NodeUpdated,
    StageStatusChanged,
    apply,
)
from skulk_core.errors import ProtocolError
from skulk_core.model import ModelCard, ModelSource
from skulk_core.placement import NodeResources, Placement, PlacementRequest, ShardRange, StageAssignment
from skulk_core.wire import PROTOCOL_VERSION, decode, encode


CARD = ModelCard("m", "llama", 30, 576, 9, 3, 2048, 100, 1000, ModelSource("local", path="/models/m.gguf"), chat_template="{{ x }}")


def record(node_id: str, memory: int = 8 << 30) -> NodeRecord:
    return NodeRecord(node_id, f"host-{node_id}", (f"127.0.0.1:{1000 + ord(node_id[0])}",), None, NodeResources(memory, memory, 2), "0.1.0", 1.0)


def events() -> list[object]:
    placement = Placement("i1", "m", [StageAssignment("a", ShardRange(0, 10, 30), "torch"), StageAssignment("b", ShardRange(10, 30, 30), "torch")])
    return [
        MasterChanged("a", 1),
        NodeJoined(record("a")),
        NodeJoined(record("b")),
        NodeUpdated("b", NodeResources(16 << 30, 15 << 30, 4), ("127.0.0.1:9",), "http://127.0.0.1:1"),
        InstancePlaced(InstanceRecord("i1", "m", placement, PlacementRequest("m", min_nodes=2), CARD)),
        StageStatusChanged("i1", "a", "ready"),
        StageStatusChanged("i1", "b", "ready"),
        NodeJoined(record("c")),
        NodeLeft("c", "missed heartbeats"),
    ]


def replay(entries: list[LogEntry]) -> ClusterState:
    state = ClusterState()
    for entry in entries:
        state = apply(state, entry)
    return state


def test_apply_builds_the_state_and_every_event_survives_the_wire() -> None:
    entries = [LogEntry(i + 1, 1, e) for i, e in enumerate(events())]  # type: ignore[arg-type]
    state = replay(entries)
    assert state.master_id == "a" and state.index == len(entries)
    assert set(state.nodes) == {"a", "b"}
    assert state.nodes["b"].resources.cpu_count == 4 and state.nodes["b"].api_url == "http://127.0.0.1:1"
    assert state.instances["i1"].status == "ready"
    # decoding the encoded entries replays to the same state: nothing is lost on the wire
    assert replay([decode(encode(e)) for e in entries]) == state  # type: ignore[misc]
    snapshot = decode(encode(Snapshot(state)))
    assert snapshot == Snapshot(state)
    after = apply(state, LogEntry(state.index + 1, 1, InstanceRemoved("i1", "deleted")))
    assert after.instances == {}
    gone = apply(state, LogEntry(state.index + 1, 1, NodeLeft("a", "killed")))
    assert gone.master_id is None and "a" not in gone.nodes


def test_a_failed_stage_fails_the_instance() -> None:
    entries = [LogEntry(i + 1, 1, e) for i, e in enumerate(events()[:5])]  # type: ignore[arg-type]
    state = apply(replay(entries), LogEntry(6, 1, StageStatusChanged("i1", "b", "failed: out of memory")))
    assert state.instances["i1"].status == "failed"


def test_decode_refuses_other_versions_unknown_types_and_garbage() -> None:
    hb = Heartbeat("a", 1.0, 1, "a", False, False, NodeResources(1, 1, 1), 0)
    body = msgpack.unpackb(encode(hb))
    with pytest.raises(ProtocolError, match="protocol version 99"):
        decode(msgpack.packb({**body, "v": 99}))
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(msgpack.packb({**body, "t": "nope"}))
    with pytest.raises(ProtocolError, match="malformed heartbeat"):
        decode(msgpack.packb({**body, "b": {"node_id": 3}}))
    rng = random.Random(7)
    for _ in range(300):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        try:
            decode(blob)
        except ProtocolError:
            pass
    assert body["v"] == PROTOCOL_VERSION


def test_concurrent_elections_converge_to_one_master() -> None:
    rng = random.Random(1)
    for trial in range(50):
        ids = [f"n{rng.randrange(10**6):06d}" for _ in range(5)]
        nodes = {i: Election(i) for i in ids}
        # every node proposes from a slightly different view of uptimes: the worst case
        proposals = []
        for i in ids:
            live = [Candidate(j, rng.choice([1.0, 1.1, 5.0]), False) for j in ids]
            proposals.append(nodes[i].propose(live))
        # messages arrive in any order, some twice
        messages = [(dst, view) for view in proposals for dst in ids] * 2
        rng.shuffle(messages)
        for dst, view in messages:
            nodes[dst].observe(view)
        views = {n.view for n in nodes.values()}
        assert len(views) == 1, (trial, views)


def test_a_running_master_is_not_displaced_by_a_newcomer_or_a_restart() -> None:
    cluster_view = View(3, "m", False)
    newcomer = Election("a")  # a smaller id than the master, fresh after a restart: round 0
    assert newcomer.observe(cluster_view) and newcomer.view == cluster_view
    old = Election("m", cluster_view)
    assert not old.observe(View(0, None))
    assert not old.observe(View(3, "zzz"))  # a worse candidate in the same round changes nothing
    assert old.observe(View(3, "zzz", True))  # but a forced master wins the round


def test_candidate_order_force_then_seniority_then_id() -> None:
    assert choose_candidate([Candidate("b", 1.0), Candidate("a", 1.0)]).node_id == "a"
    assert choose_candidate([Candidate("b", 9.0), Candidate("a", 1.0)]).node_id == "b"
    assert choose_candidate([Candidate("b", 9.0), Candidate("z", 0.1, True)]).node_id == "z"


def test_compute_plane_messages_survive_the_wire_with_samplers_and_sampled_tokens() -> None:
    import numpy as np

    from skulk_core.backend import SequenceChunk
    from skulk_core.cluster.messages import RemoteSampling, StageForward, StageResult, WireOutput
    from skulk_core.sampling import SamplingParams, TokenLogprob
    from skulk_core.tensor import Tensor

    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, logit_bias={5: -100.0, 7: 2.5}, top_logprobs=2)
    hidden = Tensor.from_numpy(np.arange(12, dtype=np.float32).reshape(2, 6))
    forward = StageForward("i1", "s1", "head", 1, (SequenceChunk("r1", 3, hidden=hidden),), (RemoteSampling("r1", params, True),))
    back = decode(encode(forward))
    assert back.samplers == forward.samplers and back.samplers[0].params.logit_bias == {5: -100.0, 7: 2.5}
    assert back.chunks[0].hidden.to_numpy().tolist() == hidden.to_numpy().tolist()
    result = StageResult("i1", "s1", (WireOutput("r1", token=42, logprob=-0.5, top=(TokenLogprob(42, -0.5), TokenLogprob(3, -1.25))),))
    assert decode(encode(result)) == result


def test_the_last_stage_samples_requests_the_head_started_there_and_sends_logits_for_others() -> None:
    import numpy as np

    from skulk_core.backend import SequenceChunk, StageOutput
    from skulk_core.cluster.messages import RemoteSampling, StageForward
    from skulk_core.instances import Instances, LocalStage
    from skulk_core.sampling import Sampler, SamplingParams

    record = InstanceRecord("i1", "m", Placement("i1", "m", [StageAssignment("a", ShardRange(0, 30, 30), "torch")]), PlacementRequest("m"), CARD)
    async def made_in_a_loop() -> LocalStage:  # its lock and cancel scope belong to an event loop
        return LocalStage(record, 1)

    local = anyio.run(made_in_a_loop)
    logits = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    params = SamplingParams(temperature=0.7, seed=99, top_logprobs=2)
    forward = StageForward("i1", "s1", "head", 1, (SequenceChunk("r1", 0, (1,)), SequenceChunk("r2", 0, (1,))), (RemoteSampling("r1", params, True),))
    sampled = Instances._last_stage_output(local, forward, StageOutput("r1", logits=logits))
    plain = Instances._last_stage_output(local, forward, StageOutput("r2", logits=logits))
    # r1: the token a sampler with the same parameters and seed draws at the head, with its logprobs
    expected = Sampler(params).sample(logits, want_logprobs=True)
    assert (sampled.token, sampled.logprob, sampled.top) == (expected.token_id, expected.logprob, expected.top)
    assert sampled.logits is None and len(sampled.top) == 2
    # r2 has no sampler there: its logits go back as they are
    assert plain.token is None and plain.logits.to_numpy().tolist() == logits.tolist()
    # the sampler lives on for the request's next steps, and goes with its release
    assert set(local.samplers) == {"r1"}
