"""A real cluster: `skulk run` processes on loopback, joined over the TCP transport.

Needs the skulk-tcp plugin (entry point `tcp`), which `make install` installs.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import time
from collections.abc import Callable, Sequence

import pytest

from skulk_core.testing import SkulkProcess, find_free_port

pytest.importorskip("skulk_tcp", reason="the TCP transport plugin is not installed")

pytestmark = pytest.mark.slow

KEY = "test-cluster-key"


def node_args(transport_port: int, peers: Sequence[int] = (), extra: Sequence[str] = ()) -> list[str]:
    args = ["--no-autoload", "--plugin", "tcp", "--transport-host", "127.0.0.1", "--transport-port", str(transport_port), "--no-discovery"]
    for port in peers:
        args += ["--peer", f"127.0.0.1:{port}"]
    return args + list(extra)


ENV = {"SKULK_CLUSTER_KEY": KEY, "SKULK_SERVE_ENABLED": "false", "SKULK_CLUSTER_HEARTBEAT_INTERVAL": "0.3", "SKULK_CLUSTER_NODE_TIMEOUT": "2.0"}


def state(node: SkulkProcess) -> dict:
    return node.get("/state")  # type: ignore[return-value]


def agreed(nodes: Sequence[SkulkProcess], count: int) -> Callable[[], bool]:
    def check() -> bool:
        states = [state(n) for n in nodes]
        masters = {s["master_id"] for s in states}
        return len(masters) == 1 and None not in masters and all(len(s["nodes"]) == count for s in states)

    return check


def start_chain(skulk_process: Callable[..., SkulkProcess], count: int, env: dict[str, str] | None = None) -> tuple[list[SkulkProcess], list[int]]:
    ports = [find_free_port() for _ in range(count)]
    nodes = []
    for i, port in enumerate(ports):
        peers = [ports[i - 1]] if i else []
        nodes.append(skulk_process(node_args(port, peers), env={**ENV, **(env or {})}))
    for node in nodes:
        node.wait_ready(30)
    return nodes, ports


def test_three_nodes_in_a_chain_form_one_cluster_and_survive_the_master(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes, ports = start_chain(skulk_process, 3)
    nodes[0].wait_for(agreed(nodes, 3), 10, "three nodes agreeing on one master")
    first = state(nodes[0])
    master_id = first["master_id"]
    by_id = {state(n)["node_id"]: (n, p) for n, p in zip(nodes, ports)}
    master, master_port = by_id[master_id]
    others = [n for n in nodes if n is not master]

    killed_at = time.monotonic()
    master.kill()  # SIGKILL: no goodbye
    others[0].wait_for(agreed(others, 2), 10, "two survivors agreeing on a new master")
    failover = time.monotonic() - killed_at
    new_master = state(others[0])["master_id"]
    assert new_master != master_id
    print(f"failover took {failover:.2f} s")

    # the old master comes back with the same identity; it must follow, not lead
    survivor_port = by_id[state(others[0])["node_id"]][1]
    reborn = skulk_process(node_args(master_port, [survivor_port]), env=ENV, data_dir=master.data_dir)
    reborn.wait_ready(30)
    everyone = [*others, reborn]
    reborn.wait_for(agreed(everyone, 3), 10, "the restarted node rejoining")
    assert state(reborn)["master_id"] == new_master
    assert state(reborn)["node_id"] == master_id  # same identity from the same data dir
    rounds = {state(n)["election_round"] for n in everyone}
    time.sleep(2)
    assert {state(n)["election_round"] for n in everyone} == rounds  # no new election
    assert {state(n)["master_id"] for n in everyone} == {new_master}


def test_a_node_with_the_wrong_secret_never_joins(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes, ports = start_chain(skulk_process, 2)
    nodes[0].wait_for(agreed(nodes, 2), 10, "two nodes agreeing")
    intruder = skulk_process(node_args(find_free_port(), [ports[0], ports[1]]), env={**ENV, "SKULK_CLUSTER_KEY": "wrong"})
    intruder.wait_ready(30)
    intruder_id = state(intruder)["node_id"]
    time.sleep(4)
    for node in nodes:
        ids = [n["node_id"] for n in state(node)["nodes"]]
        assert intruder_id not in ids and len(ids) == 2
    assert state(intruder)["nodes"] == [] or [n["node_id"] for n in state(intruder)["nodes"]] == [intruder_id]
    rejected = []
    for node in nodes:
        log = node.data_dir / "logs" / "skulk.jsonl"
        rejected += [json.loads(line) for line in log.read_text().splitlines() if '"peer.rejected"' in line]
    assert rejected, "the cluster should log the rejected peer"


def test_garbage_on_the_transport_port_does_not_disturb_the_cluster(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes, ports = start_chain(skulk_process, 2)
    nodes[0].wait_for(agreed(nodes, 2), 10, "two nodes agreeing")
    rng = random.Random(3)
    for i in range(60):
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=2) as sock:
            kind = i % 4
            if kind == 0:
                sock.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))))
            elif kind == 1:
                sock.sendall(b"\xff" * 9)  # an absurd length
            elif kind == 2:
                sock.sendall(b"SKULK")  # a truncated greeting, then silence
            else:
                pass  # connect and leave
    time.sleep(1)
    assert nodes[0].process is not None and nodes[0].process.poll() is None
    nodes[0].wait_for(agreed(nodes, 2), 5, "the cluster still agreeing")
    new = skulk_process(node_args(find_free_port(), [ports[0]]), env=ENV)
    new.wait_ready(30)
    new.wait_for(agreed([*nodes, new], 3), 10, "a new node joining after the garbage")


def test_five_nodes_started_at_once_elect_one_master_and_stay_stable(skulk_process: Callable[..., SkulkProcess]) -> None:
    ports = [find_free_port() for _ in range(5)]
    nodes = [skulk_process(node_args(port, [ports[(i + 1) % 5]]), env=ENV) for i, port in enumerate(ports)]
    for node in nodes:
        node.wait_ready(40)
    nodes[0].wait_for(agreed(nodes, 5), 15, "five nodes agreeing")
    rounds = {state(n)["election_round"] for n in nodes}
    master = state(nodes[0])["master_id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for node in nodes:
            s = state(node)
            assert s["master_id"] == master and s["election_round"] in rounds, s
        time.sleep(1)
    assert len(rounds) == 1


def test_sigterm_leaves_the_cluster_cleanly(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes, _ = start_chain(skulk_process, 2)
    nodes[0].wait_for(agreed(nodes, 2), 10, "two nodes agreeing")
    assert nodes[1].stop(signal.SIGTERM) == 0
    nodes[0].wait_for(lambda: len(state(nodes[0])["nodes"]) == 1, 10, "the stopped node leaving")
