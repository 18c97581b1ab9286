"""LAN discovery, kept on this host: announcements go to 127.255.255.255, the loopback network's
broadcast address (a datagram to 127.0.0.1 would reach only one of several sockets sharing a port;
a broadcast reaches them all, and nothing addressed to 127/8 ever leaves the machine)."""

from __future__ import annotations

import logging
import socket
import time
from contextlib import aclosing

import anyio
import pytest

from skulk_tcp import discovery

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LOOPBACK_BROADCAST = "127.255.255.255"
SECRET = b"the-cluster-secret-of-these-tests"


async def collect(feed, seconds: float, until=None) -> list:  # type: ignore[no-untyped-def]
    """Announcements heard within ``seconds`` (stops early once ``until(seen)`` is true)."""
    seen: list = []
    with anyio.move_on_after(seconds):
        async for announcement in feed:
            seen.append(announcement)
            if until is not None and until(seen):
                break
    return seen


async def test_two_nodes_find_each_other_and_a_stranger_is_ignored(make_transport, running, free_udp_port, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="skulk.tcp")
    options = {"discovery_port": free_udp_port, "discovery_address": LOOPBACK_BROADCAST, "discovery_interval": 0.2}
    a, b = make_transport(**options), make_transport(**options)
    stranger = make_transport(secret=b"another cluster's secret", **options)
    assert make_transport().discover() is None  # discovery off without a discovery port
    feed_a, feed_b = a.discover(), b.discover()
    async with running(a), running(b), running(stranger), aclosing(feed_a), aclosing(feed_b):
        a_id, b_id, stranger_id = (t.context.identity.node_id for t in (a, b, stranger))
        # a forged announcement (right shape, wrong key) and a stale one (right key, old time)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            raw.sendto(discovery.encode(b"guess", "forged", "127.0.0.1:1", time.time()), (LOOPBACK_BROADCAST, free_udp_port))
            raw.sendto(discovery.encode(SECRET, "stale", "127.0.0.1:2", time.time() - 120), (LOOPBACK_BROADCAST, free_udp_port))
            raw.sendto(b"not an announcement at all", (LOOPBACK_BROADCAST, free_udp_port))
        heard_by_a = await collect(feed_a, 5, until=lambda seen: len(seen) >= 3)
        heard_by_b = await collect(feed_b, 5, until=lambda seen: len(seen) >= 3)
    assert {x.node_id for x in heard_by_a} == {b_id}
    assert {x.node_id for x in heard_by_b} == {a_id}
    assert {x.address for x in heard_by_a} == {b.address}
    assert {x.address for x in heard_by_b} == {a.address}
    assert stranger_id not in {x.node_id for x in heard_by_a + heard_by_b}
    ignored = [r.getMessage() for r in caplog.records if "ignoring a discovery datagram" in r.getMessage()]
    assert any("does not match this cluster's secret" in line for line in ignored)  # the stranger, the forgery
    assert any("from this node's clock" in line for line in ignored)  # the stale one
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "discovery datagram" in r.getMessage())


async def test_the_feed_ends_when_the_transport_stops(make_transport, running, free_udp_port) -> None:
    a = make_transport(discovery_port=free_udp_port, discovery_address=LOOPBACK_BROADCAST)
    feed = a.discover()
    async with running(a):
        pass
    with anyio.fail_after(2):
        assert [x async for x in feed] == []


def test_announcements_round_trip_and_reject_tampering() -> None:
    now = time.time()
    datagram = discovery.encode(SECRET, "node-a", "10.0.0.5:52416", now)
    assert discovery.decode(SECRET, datagram, now=now + 1, max_age=30) == discovery.Announcement("node-a", "10.0.0.5:52416", now)
    tampered = datagram.replace(b"10.0.0.5", b"10.0.0.6")
    with pytest.raises(discovery.BadAnnouncement, match="MAC"):
        discovery.decode(SECRET, tampered, now=now, max_age=30)
    with pytest.raises(discovery.BadAnnouncement, match="clock"):
        discovery.decode(SECRET, datagram, now=now + 31, max_age=30)
    with pytest.raises(discovery.BadAnnouncement, match="clock"):
        discovery.decode(SECRET, datagram, now=now - 31, max_age=30)
    with pytest.raises(discovery.BadAnnouncement):
        discovery.decode(SECRET, datagram[:20], now=now, max_age=30)
    with pytest.raises(discovery.BadAnnouncement):
        discovery.decode(SECRET, bytes(2000), now=now, max_age=30)


def test_a_node_listening_everywhere_is_reached_on_the_host_it_spoke_from() -> None:
    assert discovery.with_host("0.0.0.0:52416", "192.168.1.7") == "192.168.1.7:52416"
    assert discovery.with_host("[::]:52416", "fe80::1") == "[fe80::1]:52416"
    assert discovery.with_host("10.0.0.5:52416", "192.168.1.7") == "10.0.0.5:52416"
