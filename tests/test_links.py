"""Direct stage links (skulk_core.links) on loopback: a link opens only with a token the listener
offered, once and in time; frames arrive whole and typed; bad frames close the link with
ProtocolError; closing ends every thread; a frame too big for the socket's buffer is finished on a
thread without interleaving."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time

import numpy as np
import pytest

from skulk_core import links
from skulk_core.backend import SequenceChunk
from skulk_core.cluster.messages import StageForward, StageResult, WireOutput
from skulk_core.errors import ProtocolError, TransportError
from skulk_core.links import FRAME, LinkServer, LinkTarget, connect, receive
from skulk_core.tensor import Tensor

TARGET = LinkTarget("instance-1", 1, "node-a")


class Recorder:
    """An ``on_link`` that records what each link delivers (on the link's own thread)."""

    def __init__(self) -> None:
        self.messages: queue.SimpleQueue[tuple[LinkTarget, object]] = queue.SimpleQueue()
        self.ended: queue.SimpleQueue[tuple[LinkTarget, BaseException | None]] = queue.SimpleQueue()

    def __call__(self, target: LinkTarget, sock: socket.socket) -> None:
        error: BaseException | None = None
        try:
            while (msg := receive(sock)) is not None:
                self.messages.put((target, msg))
        except (ProtocolError, TransportError) as exc:
            error = exc
        self.ended.put((target, error))


@pytest.fixture
def server():
    recorder = Recorder()
    server = LinkServer("127.0.0.1", recorder)
    server.start()
    server.recorder = recorder  # type: ignore[attr-defined]
    yield server
    server.close()


def forward(step: str = "s1", rows: int = 1) -> StageForward:
    hidden = Tensor.from_numpy(np.arange(rows * 576, dtype=np.float32).reshape(rows, 576))
    return StageForward("instance-1", step, "node-head", 1, (SequenceChunk("r", 7, None, hidden),))


def test_an_offered_token_opens_one_link_that_carries_typed_messages(server: LinkServer) -> None:
    token = server.offer(TARGET)
    link = connect(server.address, token)
    try:
        sent = [forward("s1"), forward("s2", rows=3), StageResult("instance-1", "s3", (WireOutput("r", token=42),))]
        for msg in sent:
            link.send(msg)
        got = [server.recorder.messages.get(timeout=5) for _ in sent]  # type: ignore[attr-defined]
        assert [t for t, _ in got] == [TARGET] * 3
        assert [m for _, m in got] == sent
        assert got[1][1].chunks[0].hidden.to_numpy()[2, 5] == 2 * 576 + 5  # type: ignore[attr-defined]
    finally:
        link.close()
    assert server.recorder.ended.get(timeout=5) == (TARGET, None)  # type: ignore[attr-defined]
    with pytest.raises(TransportError, match="refused"):
        connect(server.address, token)  # a token opens one link only


def test_the_listener_takes_the_configured_port() -> None:
    from skulk_core.testing import find_free_port

    port = find_free_port()
    recorder = Recorder()
    server = LinkServer("127.0.0.1", recorder, port)
    server.start()
    try:
        assert server.address == f"127.0.0.1:{port}"
        link = connect(f"127.0.0.1:{port}", server.offer(TARGET))
        link.send(forward())
        assert recorder.messages.get(timeout=5)[1] == forward()
        link.close()
    finally:
        server.close()


def test_an_ipv6_listener_gives_an_address_peers_can_dial() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    recorder = Recorder()
    server = LinkServer("::1", recorder)
    try:
        server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert server.address == f"[::1]:{server.port}"
        link = connect(server.address, server.offer(TARGET))
        link.send(forward())
        assert recorder.messages.get(timeout=5)[1] == forward()
        link.close()
    finally:
        server.close()


def test_a_wrong_or_expired_token_gets_nowhere(server: LinkServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.offer(TARGET)
    with pytest.raises(TransportError, match="refused"):
        connect(server.address, b"x" * links.TOKEN_BYTES)
    monkeypatch.setattr(links, "TOKEN_TTL", -1.0)
    expired = server.offer(TARGET)
    with pytest.raises(TransportError, match="refused"):
        connect(server.address, expired)
    assert server.recorder.messages.empty() and server.recorder.ended.empty()  # type: ignore[attr-defined]


def test_a_silent_connection_is_closed_after_the_handshake_timeout(server: LinkServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(links, "HANDSHAKE_TIMEOUT", 0.3)
    host, port = server.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the listener, without an answer
        assert time.monotonic() - started < 3
    # the listener still serves a proper link afterwards
    link = connect(server.address, server.offer(TARGET))
    link.send(forward())
    assert server.recorder.messages.get(timeout=5)[1] == forward()  # type: ignore[attr-defined]
    link.close()


@pytest.mark.parametrize(
    "raw, reason",
    [
        (FRAME.pack(links.MAX_MESSAGE_BYTES + 1), "over the"),
        (FRAME.pack(5) + b"\xc1junk", "not a msgpack envelope"),
        (FRAME.pack(100), "inside a 100-byte frame"),
        (FRAME.pack(100) + b"short", "after 5 of 100 bytes"),
        (FRAME.pack(3)[:2], "after 2 of 4 bytes"),
    ],
)
def test_a_bad_frame_ends_the_link_with_a_protocol_error(server: LinkServer, raw: bytes, reason: str) -> None:
    link = connect(server.address, server.offer(TARGET))
    link.sock.sendall(raw)
    link.sock.shutdown(socket.SHUT_WR)
    target, error = server.recorder.ended.get(timeout=5)  # type: ignore[attr-defined]
    assert target == TARGET and isinstance(error, ProtocolError) and reason in str(error), error
    link.close()


def test_an_unregistered_message_type_is_refused(server: LinkServer) -> None:
    import msgpack

    link = connect(server.address, server.offer(TARGET))
    payload = msgpack.packb({"v": 1, "t": "not_a_message", "b": {}})
    link.sock.sendall(FRAME.pack(len(payload)) + payload)
    _, error = server.recorder.ended.get(timeout=5)  # type: ignore[attr-defined]
    assert isinstance(error, ProtocolError) and "unknown message type" in str(error)
    link.close()


def test_closing_the_server_ends_its_links_and_a_sender_learns_it(server: LinkServer) -> None:
    link = connect(server.address, server.offer(TARGET))
    link.send(forward())
    server.recorder.messages.get(timeout=5)  # type: ignore[attr-defined]
    before = {t.name for t in threading.enumerate()}
    assert "skulk links" in before and "skulk link" in before
    server.close()
    assert server.recorder.ended.get(timeout=5)[0] == TARGET  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while any(t.name in ("skulk links", "skulk link") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [t.name for t in threading.enumerate() if t.name in ("skulk links", "skulk link")]
    with pytest.raises(TransportError):
        for _ in range(100):  # the first sends may still land in the socket's buffer
            link.send(forward())
            time.sleep(0.01)
    assert link.closed
    with pytest.raises(TransportError, match="closed"):
        link.send(forward())


def test_close_links_closes_only_that_instances_links(server: LinkServer) -> None:
    other = LinkTarget("instance-2", 1, "node-a")
    mine, theirs = connect(server.address, server.offer(TARGET)), connect(server.address, server.offer(other))
    for link in (mine, theirs):
        link.send(forward())
    for _ in range(2):
        server.recorder.messages.get(timeout=5)  # type: ignore[attr-defined]
    server.close_links("instance-1")
    assert server.recorder.ended.get(timeout=5)[0] == TARGET  # type: ignore[attr-defined]
    theirs.send(forward())
    assert server.recorder.messages.get(timeout=5)[0] == other  # type: ignore[attr-defined]
    mine.close()
    theirs.close()


def test_a_frame_larger_than_the_socket_buffer_is_finished_on_a_thread(server: LinkServer) -> None:
    """send_now (the event loop's send) never blocks: what the socket does not take is returned as
    a call for a worker thread, and a frame sent meanwhile from another thread waits for it whole."""
    link = connect(server.address, server.offer(TARGET))
    link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = forward("big", rows=2000)  # 4.6 MB
    rest = link.send_now(big)
    assert rest is not None
    other = threading.Thread(target=link.send, args=(forward("after"),))
    finisher = threading.Thread(target=rest)
    finisher.start()
    time.sleep(0.05)
    other.start()
    finisher.join(10)
    other.join(10)
    got = [server.recorder.messages.get(timeout=10)[1] for _ in range(2)]  # type: ignore[attr-defined]
    assert got == [big, forward("after")]
    assert link.send_now(forward("small")) is None  # a small frame goes at once
    assert server.recorder.messages.get(timeout=5)[1] == forward("small")  # type: ignore[attr-defined]
    link.close()


def test_a_link_to_nothing_fails_clearly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransportError, match="cannot open a stage link"):
        connect(f"127.0.0.1:{port}", b"t" * links.TOKEN_BYTES, timeout=2)


class LinkedPipeline:
    """Two nodes in this process (threads), a tiny torch model split over both, a stage each."""

    def __init__(self, head, other, instance_id: str, model_id: str) -> None:
        self.head, self.other, self.instance_id, self.model_id = head, other, instance_id, model_id

    @property
    def stages(self) -> list:
        return [self.head.instances.stages[self.instance_id], self.other.instances.stages[self.instance_id]]

    def greedy(self, max_tokens: int = 8) -> list[int]:
        from skulk_core.inference import GenerationRequest
        from skulk_core.sampling import SamplingParams

        request = GenerationRequest(self.model_id, (1, 2, 3, 4, 5), SamplingParams(temperature=0.0), max_tokens=max_tokens, ignore_eos=True)

        async def run() -> list[int]:
            tokens: list[int] = []
            async for chunk in self.head.models.generate(request):
                tokens += [t.token_id for t in chunk.tokens]
            return tokens

        return self.head.portal.call(run)


def wait(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def linked_pipeline(tmp_path):
    pytest.importorskip("skulk_tcp", reason="the TCP transport plugin is not installed")
    pytest.importorskip("skulk_torch", reason="the torch backend plugin is not installed")
    from skulk_core.testing import start_node_in_thread, write_synthetic_gguf

    model = write_synthetic_gguf(tmp_path / "tiny-linked.gguf", n_layers=4)
    sections: dict = {"cluster": {"key": "links-test", "heartbeat_interval": 0.2}, "serve": {"threads": 1}}
    with contextlib.ExitStack() as stack:
        first = start_node_in_thread(stack, tmp_path / "a", plugins=["tcp", "torch"], sections=sections)
        wait(lambda: bool(first.cluster.addresses), "the first node's transport")
        peers = {**sections, "cluster": {**sections["cluster"], "peers": list(first.cluster.addresses)}}
        second = start_node_in_thread(stack, tmp_path / "b", plugins=["tcp", "torch"], sections=peers)
        nodes = [first, second]
        wait(lambda: all(len(n.cluster.state.nodes) == 2 for n in nodes), "two nodes joined")
        instance_id = first.portal.call(lambda: first.instances.place(str(model), backend="torch", min_nodes=2))
        wait(lambda: any(instance_id in n.instances.heads for n in nodes), "the pipeline's head")
        head = next(n for n in nodes if instance_id in n.instances.heads)
        yield LinkedPipeline(head, second if head is first else first, instance_id, "tiny-linked")


def test_a_cut_link_falls_back_to_the_transport_then_opens_again(tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Two nodes in this process, a tiny model split over both: its steps go on direct links; when
    both links are cut under them (a network fault), the steps in flight go on the transport, the
    greedy tokens stay the same, and new links open."""
    from skulk_core import instances as instances_module

    monkeypatch.setattr(instances_module, "LINK_RETRY", 0.0)  # try a new link at the next step
    caplog.set_level(logging.INFO, logger="skulk.instances")
    with linked_pipeline(tmp_path) as pipeline:
        expected = pipeline.greedy()
        assert len(expected) == 8
        stages = pipeline.stages
        cut = [stage.outbound for stage in stages]
        assert all(link is not None and not link.closed for link in cut)  # head -> stage 1, stage 1 -> head
        for link in cut:
            link.sock.shutdown(socket.SHUT_RDWR)  # the links do not know yet
        assert pipeline.greedy() == expected
        assert all(link.closed for link in cut)
        # new links open in the background (steps never wait for one)
        wait(lambda: all(s.outbound is not None and s.outbound not in cut and not s.outbound.closed for s in stages), "new links")
        assert pipeline.greedy() == expected
    assert "stage 0 of tiny-linked sends on the transport" in caplog.text
    assert "stage 1 of tiny-linked sends on the transport" in caplog.text


def test_a_step_goes_on_from_the_compute_thread_right_after_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With links open, each stage's step is written to the next stage's link by the thread that
    computed it (the process's compute thread, which the torch engine names as its step_thread),
    at the head and at the last stage, which samples there too: no other thread wakes on a hop."""
    from skulk_core.cluster.messages import StageForward, StageResult
    from skulk_core.links import Link

    writes: list[tuple[str, str]] = []
    send_now = Link.send_now

    def recording_send_now(self: Link, message: object):
        writes.append((type(message).__name__, threading.current_thread().name))
        return send_now(self, message)

    with linked_pipeline(tmp_path) as pipeline:
        expected = pipeline.greedy()  # the links open meanwhile
        wait(lambda: all(s.outbound is not None and not s.outbound.closed for s in pipeline.stages), "both links")
        assert all(s.engine.step_thread.name == "skulk compute" for s in pipeline.stages)
        monkeypatch.setattr(Link, "send_now", recording_send_now)
        monkeypatch.setattr(Link, "send", lambda self, message: pytest.fail("a blocking write of a step"))
        assert pipeline.greedy() == expected
    forwards = [thread for kind, thread in writes if kind == StageForward.__name__]
    results = [thread for kind, thread in writes if kind == StageResult.__name__]
    assert len(forwards) == len(results) == 8  # the prompt's step, then one a token but the last
    assert set(forwards) == set(results) == {"skulk compute"}


def test_a_frame_the_socket_cannot_take_at_once_never_blocks_the_compute_thread(tmp_path) -> None:
    """A stage passes its step on from the compute thread every engine of its process shares, so a
    frame the socket's buffer cannot take (a long prefill, a next node that stopped reading) is
    finished by a thread of its own: the compute thread goes on at once, and the frame arrives whole."""
    from skulk_core.links import Link

    with linked_pipeline(tmp_path) as pipeline:
        pipeline.greedy(2)
        wait(lambda: all(s.outbound is not None and not s.outbound.closed for s in pipeline.stages), "both links")
        stage = pipeline.stages[1]
        ours, theirs = socket.socketpair()
        theirs.settimeout(10)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        kept, stage.outbound = stage.outbound, Link(ours, "a test socket nobody reads yet")
        try:
            big = forward("big", rows=2000)  # 4.6 MB
            passed: list[bool] = []
            caller = threading.Thread(target=lambda: passed.append(pipeline.other.instances._pass_on(stage, stage.next_node_id, big)))
            caller.start()
            caller.join(2.0)
            assert passed == [True]  # returned although nobody has read a byte yet
            assert any(t.name == "skulk link send" for t in threading.enumerate())
            assert receive(theirs) == big
            wait(lambda: not any(t.name == "skulk link send" for t in threading.enumerate()), "the sending thread to end")
        finally:
            stage.outbound.close()
            theirs.close()
            stage.outbound = kept
        assert len(pipeline.greedy(2)) == 2
