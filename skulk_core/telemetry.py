"""Telemetry values: cluster events, request trace spans and metric samples.

Every telemetry hook implementation receives every value (none is firstresult); the builtin
structured-log plugin writes events as JSON lines.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Union

from attrs import field, frozen

JSONScalar = Union[str, int, float, bool, None]


def _freeze(attributes: Mapping[str, object]) -> Mapping[str, object]:
    return dict(attributes)


@frozen
class ClusterEvent:
    """Something that happened to the node or the cluster.

    ``kind`` is dotted, e.g. ``node.started``, ``node.stopped``, ``peer.joined``, ``peer.left``,
    ``peer.rejected``, ``master.elected``, ``instance.placed``, ``instance.ready``,
    ``plugin.loaded``. ``attributes`` holds JSON-compatible values.
    """

    kind: str
    node_id: str
    attributes: Mapping[str, object] = field(factory=dict, converter=_freeze)
    at: float = field(factory=time.time)


@frozen
class TraceSpan:
    """One timed step of a request (``queue``, ``prefill``, ``decode``, ``stage``, ``request``)."""

    trace_id: str
    span_id: str
    name: str
    node_id: str
    start: float
    end: float
    parent_id: str | None = None
    attributes: Mapping[str, object] = field(factory=dict, converter=_freeze)

    @property
    def duration(self) -> float:
        return self.end - self.start


@frozen
class MetricSample:
    """One measurement: a counter increment, a gauge value or an observation for a histogram."""

    name: str  # e.g. "skulk_tokens_generated_total"
    value: float
    kind: str = "gauge"  # "counter", "gauge", "histogram"
    labels: Mapping[str, str] = field(factory=dict, converter=_freeze)
    at: float = field(factory=time.time)
