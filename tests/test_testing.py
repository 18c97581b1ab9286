"""The helpers skulk_core.testing gives plugin authors: free ports that stay free."""

from __future__ import annotations

import itertools
import socket

from skulk_core import testing
from skulk_core.testing import _listening_ports, find_free_port


def test_free_ports_are_below_the_ephemeral_range_and_bindable():
    first, last = _listening_ports()
    ports = [find_free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never the same port twice in one process
    for port in ports:
        assert first <= port < last
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out(monkeypatch):
    first, last = _listening_ports()
    busy = []
    try:
        for port in range(first, last):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sock.listen()
            busy.append(sock)
            if len(busy) == 5:
                break
        busy_ports = [s.getsockname()[1] for s in busy]

        class BusyFirst:
            """A fake random source: it offers the busy ports before any other."""

            def __init__(self) -> None:
                self.offers = itertools.chain(busy_ports, range(last - 1, first, -1))

            def randrange(self, start: int, stop: int) -> int:
                return next(self.offers)

        monkeypatch.setattr(testing.random, "SystemRandom", BusyFirst)
        chosen = find_free_port()
        assert chosen not in busy_ports and first <= chosen < last
    finally:
        for sock in busy:
            sock.close()


def test_outgoing_connections_do_not_use_the_ports_chosen():
    """The source port of a connection comes from the ephemeral range, above every chosen port."""
    _, last = _listening_ports()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", find_free_port()))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            assert client.getsockname()[1] >= last
