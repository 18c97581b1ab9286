"""Placement values (which node runs which layers with which backend) and the builtin placement.

The builtin memory-weighted pipeline placement is itself a plugin (``skulk_core.builtin.placement``)
so a third party can replace it; the values here are what every placement plugin returns.
"""

from __future__ import annotations

from attrs import field, frozen


@frozen
class ShardRange:
    """A contiguous range of transformer layers ``[start, end)`` of a model with ``n_layers``.

    The first shard (``start == 0``) also embeds tokens; the last (``end == n_layers``) also applies
    the final norm and the output head and returns logits. A shard with both is the whole model.
    """

    start: int
    end: int
    n_layers: int

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.start < self.end <= self.n_layers:
            raise ValueError(
                f"invalid layer range [{self.start}, {self.end}) of a {self.n_layers}-layer model"
            )

    @classmethod
    def whole(cls, n_layers: int) -> ShardRange:
        return cls(0, n_layers, n_layers)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_layers

    @property
    def is_whole(self) -> bool:
        return self.is_first and self.is_last

    @property
    def layer_count(self) -> int:
        return self.end - self.start


@frozen
class Accelerator:
    kind: str  # "cuda", "mps", "metal", "rocm"
    name: str
    memory_total: int


@frozen
class BackendSite:
    """Where a backend's stages live on a node other than in its system memory (a GPU), and the
    bytes free there, as the backend reports it (``Backend.memory_site``)."""

    device: str  # as EngineOptions.device names it: "cuda", "cuda:1"
    memory_available: int


@frozen
class NodeResources:
    """What a node offers, as it reports in its heartbeats."""

    memory_total: int
    memory_available: int
    cpu_count: int
    memory_limit: int | None = None  # operator's cap (--memory-limit), bytes
    accelerators: tuple[Accelerator, ...] = field(default=(), converter=tuple)
    backends: tuple[str, ...] = field(default=(), converter=tuple)
    models: tuple[str, ...] = field(default=(), converter=tuple)
    # by backend name: where that backend's stages would live, when not in system memory
    sites: dict[str, BackendSite] = field(factory=dict, hash=False)  # (a dict cannot be hashed)

    @property
    def usable_memory(self) -> int:
        """System memory a stage may take: what is available, capped by ``--memory-limit``."""
        return self._capped(self.memory_available)

    def usable_for(self, backend: str) -> int:
        """Memory a stage of ``backend`` may take here: its site's (a GPU's) or the system's, capped
        by ``--memory-limit``."""
        site = self.sites.get(backend)
        return self._capped(self.memory_available if site is None else site.memory_available)

    def device_for(self, backend: str) -> str | None:
        """The device ``backend``'s stages would use here, when it reported one."""
        site = self.sites.get(backend)
        return None if site is None else site.device

    def _capped(self, available: int) -> int:
        return available if self.memory_limit is None else min(available, self.memory_limit)


@frozen
class NodeView:
    """One live node as placement sees it."""

    node_id: str
    name: str
    resources: NodeResources
    excluded: bool = False  # the operator asked that nothing be placed here


@frozen
class PlacementRequest:
    """What the user asked for: a model, optionally a backend and a node count range."""

    model_id: str
    backend: str | None = None
    min_nodes: int = 1
    max_nodes: int | None = None
    context_length: int | None = None  # KV cache to reserve per sequence; the card's if None
    max_sequences: int = 8  # sequences decoded in parallel, for the KV-cache estimate
    exclude_nodes: frozenset[str] = field(default=frozenset(), converter=frozenset)


@frozen
class StageAssignment:
    """One stage of a placement: a node runs a layer range with a backend."""

    node_id: str
    shard: ShardRange
    backend: str


@frozen
class Placement:
    """Where an instance of a model runs. Stages are in pipeline order (first embeds)."""

    instance_id: str
    model_id: str
    stages: tuple[StageAssignment, ...] = field(converter=tuple)
    kind: str = "pipeline"  # "pipeline" (layer ranges); "tensor" (shards) is reserved

    def __attrs_post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a placement needs at least one stage")
        expected = 0
        for stage in self.stages:
            if stage.shard.start != expected:
                raise ValueError(f"stages do not tile the layers: a stage starts at {stage.shard.start}, expected {expected}")
            expected = stage.shard.end
        if expected != self.stages[0].shard.n_layers:
            raise ValueError("the last stage does not end at the model's last layer")

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.stages)


@frozen
class PlacementPreview:
    """A placement the user could ask for, or why none fits (``placement`` None, ``reason`` set)."""

    placement: Placement | None
    reason: str | None = None
