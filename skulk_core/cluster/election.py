"""Master election: a deterministic, sticky algorithm that converges to one master.

Every node holds an election view ``(round, master)``. Heartbeats and election messages carry the
sender's view; a node adopts any view that is *better* than its own: a higher round, or the same
round with a better-ranked master (a ``--force-master`` node first, then the smaller node id).
A node starts an election only when its master is gone (or it has none once the start-up wait is
over): it proposes ``(round + 1, candidate)`` where the candidate is the live node (itself included)
ranked first by force-master, then seniority (longest uptime), then node id.

Why this shape: a running master is never challenged while it is alive (no re-election on joins or
on connection churn shorter than the node timeout), rounds only grow, and two concurrent proposals
in one round are settled by a total order every node computes the same way, so the views converge
as soon as the nodes hear each other. A node that restarts comes back with round 0 and adopts the
cluster's view from the first heartbeat it hears, so it never becomes a second master.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import define, frozen


@frozen
class Candidate:
    node_id: str
    uptime: float
    force_master: bool = False


@frozen
class View:
    round: int
    master_id: str | None
    master_force: bool = False

    def rank(self) -> tuple[int, int, str]:
        # Higher is better: round, then force-master, then the *smaller* id (negated by sorting).
        return (self.round, 1 if self.master_force else 0, _invert(self.master_id or ""))


def _invert(text: str) -> str:
    # Maps a smaller id to a larger string, so tuples compare "higher is better" throughout.
    return "".join(chr(0x10FFFF - ord(c)) for c in text)


def choose_candidate(live: Iterable[Candidate]) -> Candidate:
    """Force-master first, then the longest uptime (seniority), then the smallest node id."""
    return min(live, key=lambda c: (not c.force_master, -round(c.uptime, 1), c.node_id))


@define
class Election:
    """One node's election view."""

    node_id: str
    view: View = View(0, None)

    @property
    def master_id(self) -> str | None:
        return self.view.master_id

    @property
    def round(self) -> int:
        return self.view.round

    def observe(self, view: View) -> bool:
        """Adopt ``view`` if it is better than ours; True when our view changed."""
        if view.master_id is None or view.rank() <= self.view.rank():
            return False
        self.view = view
        return True

    def propose(self, live: Iterable[Candidate]) -> View:
        """Start a new round with the best live candidate; we adopt our own proposal."""
        best = choose_candidate(live)
        self.view = View(self.view.round + 1, best.node_id, best.force_master)
        return self.view
