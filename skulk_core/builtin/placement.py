"""Builtin placement plugin: memory-weighted pipeline placement.

Choose the fewest nodes (at least ``min_nodes``) whose usable memory, less a safety margin, holds
the model; split the model in proportion to what each node can hold, at least one layer each.
Usable memory is the node's available memory, or its GPU's free memory for a backend that puts its
stages there (``memory_site``), capped by its ``--memory-limit``. What a node can hold is that
memory over what the whole model would need on its device: a GPU that stores half-precision weights
holds twice the layers a CPU node of the same bytes holds in single precision. The memory a stage
needs comes from its backend's estimate (weights for its layers, KV cache for the configured context
and sequences, runtime overhead). It runs last, so any other placement plugin can take precedence.

What is split is the work of a token, not the layer count: the last stage also runs the output head
(vocabulary x hidden), which in a small model costs as much as several blocks, and a pipeline runs
at the pace of its slowest stage. The head counts as ``head_flops / block_flops`` blocks, the
blocks' cost raised by the backend's ``block_overhead`` (what a block costs beyond its matmuls):
SmolLM2-135M's head has the MACs of 8 blocks and costs the torch backend 6, so two equal nodes get
18 and 12 + head layers rather than 15 and 15 + head. When that split does not fit a node's memory,
the plain layer split is tried before the node count grows.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence

import attrs

from skulk_core.backend import Backend, EngineOptions
from skulk_core.errors import PlacementError
from skulk_core.hookspecs import hookimpl
from skulk_core.model import ModelCard
from skulk_core.placement import (
    NodeView,
    Placement,
    PlacementPreview,
    PlacementRequest,
    ShardRange,
    StageAssignment,
)
from skulk_core.registry import BackendRegistry

SAFETY_MARGIN = 0.05  # of each node's usable memory, left free
GIB = 1024**3


def split_layers(n_layers: int, weights: Sequence[int]) -> list[tuple[int, int]]:
    """Split ``n_layers`` into contiguous ranges proportional to ``weights``, at least one each.

    Largest-remainder rounding, so the split is deterministic and sums exactly to ``n_layers``.
    """
    count = len(weights)
    if count > n_layers:
        raise ValueError(f"cannot split {n_layers} layers over {count} nodes")
    total = sum(max(w, 1) for w in weights)
    spare = n_layers - count  # one layer each is given first
    raw = [spare * max(w, 1) / total for w in weights]
    shares = [1 + int(r) for r in raw]
    left = n_layers - sum(shares)
    by_remainder = sorted(range(count), key=lambda i: (-(raw[i] - int(raw[i])), i))
    for i in by_remainder[:left]:
        shares[i] += 1
    ranges, start = [], 0
    for share in shares:
        ranges.append((start, start + share))
        start += share
    return ranges


def split_work(n_layers: int, head_blocks: float, weights: Sequence[int]) -> list[tuple[int, int]]:
    """Split ``n_layers`` so that each range's work is proportional to ``weights``, where the last
    range also carries an output head worth ``head_blocks`` blocks; at least one layer each.

    Each boundary is the cumulative share of the whole work (layers plus head), rounded to the
    nearest layer; deterministic, and ``split_layers`` when ``head_blocks`` is 0.
    """
    count = len(weights)
    if count > n_layers:
        raise ValueError(f"cannot split {n_layers} layers over {count} nodes")
    if head_blocks <= 0:
        return split_layers(n_layers, weights)
    shares = [max(w, 1) for w in weights]
    total, work = sum(shares), n_layers + head_blocks
    ranges, start, cumulative = [], 0, 0
    for index, share in enumerate(shares[:-1]):
        cumulative += share
        end = math.floor(work * cumulative / total + 0.5)
        end = min(max(end, start + 1), n_layers - (count - 1 - index))  # room for the ranges after it
        ranges.append((start, end))
        start = end
    ranges.append((start, n_layers))
    return ranges


def head_blocks(card: ModelCard, block_overhead: float = 0.0) -> float:
    """The output head's work per token, in blocks of this model on a backend whose blocks cost
    ``block_overhead`` more than their matrix multiplications (``BackendCapabilities``)."""
    block = card.block_flops() * (1 + block_overhead)
    return card.head_flops() / block if block > 0 else 0.0


def _fmt(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _choose_backend(card: ModelCard, nodes: Sequence[NodeView], request: PlacementRequest, backends: BackendRegistry) -> str:
    names = [request.backend] if request.backend else [b for b in card.backends if b in backends] + [
        b for b in backends.names() if b not in card.backends
    ]
    reasons = []
    for name in names:
        if name not in backends:
            reasons.append(f"{name}: not installed (registered backends: {', '.join(backends.names()) or 'none'})")
            continue
        why_not = backends.backend(name).supports(card)
        if why_not:
            reasons.append(f"{name}: {why_not}")
            continue
        if not any(name in n.resources.backends for n in nodes):
            reasons.append(f"{name}: no live node runs it")
            continue
        return name
    raise PlacementError(f"no backend can run {card.id}: " + "; ".join(reasons or ["no backend is registered"]))


def _plans(card: ModelCard, nodes: Sequence[NodeView], request: PlacementRequest, backends: BackendRegistry, settings: Mapping[str, object]):  # type: ignore[no-untyped-def]
    """Yield (node_count, Placement | None, reason) for every node count worth trying. Stages are
    sized with ``settings`` (the placing node's config sections), as the backend will load them."""
    backend_name = _choose_backend(card, nodes, request, backends)
    backend = backends.backend(backend_name)
    options = EngineOptions(
        context_length=request.context_length or card.context_length,
        max_sequences=request.max_sequences,
        settings=settings.get(backend_name),
    )
    capacity = _capacities(card, nodes, backend, backend_name, options)
    candidates = sorted(
        (
            n
            for n in nodes
            if not n.excluded and n.node_id not in request.exclude_nodes and backend_name in n.resources.backends
        ),
        key=lambda n: (-capacity[n.node_id], n.node_id),
    )
    most = min(len(candidates), card.n_layers, request.max_nodes or len(candidates))
    if not backend.capabilities.layer_ranges:
        most = min(most, 1)
    if request.min_nodes > most:
        why = (
            f"{backend_name} cannot split a model into layer ranges"
            if not backend.capabilities.layer_ranges
            else f"only {len(candidates)} eligible node(s)"
        )
        yield request.min_nodes, None, f"{request.min_nodes} node(s) requested but {why}"
        return
    head = head_blocks(card, backend.capabilities.block_overhead)
    for count in range(max(request.min_nodes, 1), most + 1):
        chosen = candidates[:count]
        memory = [capacity[n.node_id] for n in chosen]
        splits = [split_work(card.n_layers, head, memory)]
        if splits[0] != (by_layers := split_layers(card.n_layers, memory)):
            splits.append(by_layers)  # the balanced split may overfill a node the plain one does not
        for ranges in splits:
            stages, problems = [], []
            for node, (start, end) in zip(chosen, ranges):
                shard = ShardRange(start, end, card.n_layers)
                # sized for where the stage would live on that node (a GPU holds half-precision weights)
                need = backend.estimate_memory(card, shard, attrs.evolve(options, device=node.resources.device_for(backend_name)))
                have = int(node.resources.usable_for(backend_name) * (1 - SAFETY_MARGIN))
                if need > have:
                    problems.append(f"{node.name} ({node.node_id}) needs {_fmt(need)} for layers {start}-{end - 1}, has {_fmt(have)}")
                stages.append(StageAssignment(node.node_id, shard, backend_name))
            if not problems:
                break
        if problems:
            yield count, None, f"{count} node(s): " + "; ".join(problems)
        else:
            yield count, Placement(uuid.uuid4().hex[:12], card.id, stages), None


def _capacities(card: ModelCard, nodes: Sequence[NodeView], backend: Backend, backend_name: str, options: EngineOptions) -> dict[str, int]:
    """What each node can hold of the model, as bytes of system memory: its usable memory scaled by
    how much less the whole model needs where the node would put it. A GPU holding half-precision
    weights then counts for twice its bytes beside a CPU node holding single precision, so splits
    and the choice of nodes follow the layers a node can hold, not its raw bytes."""
    whole = ShardRange.whole(card.n_layers)
    reference = backend.estimate_memory(card, whole, options)
    needs: dict[str | None, int] = {None: reference}
    capacity = {}
    for node in nodes:
        device = node.resources.device_for(backend_name)
        if device not in needs:
            needs[device] = backend.estimate_memory(card, whole, attrs.evolve(options, device=device))
        usable = node.resources.usable_for(backend_name)
        need = needs[device]
        capacity[node.node_id] = usable if need <= 0 or reference <= 0 else int(usable * reference / need)
    return capacity


@hookimpl(trylast=True)
def skulk_place(
    card: ModelCard, nodes: Sequence[NodeView], request: PlacementRequest, backends: BackendRegistry, settings: Mapping[str, object]
) -> Placement | None:
    reasons = []
    for _, placement, reason in _plans(card, nodes, request, backends, settings):
        if placement is not None:
            return placement
        reasons.append(reason)
    raise PlacementError(f"nothing can hold {card.id} ({_fmt(card.bytes_on_disk)} on disk): " + " | ".join(reasons))


@hookimpl
def skulk_placement_previews(
    card: ModelCard, nodes: Sequence[NodeView], request: PlacementRequest, backends: BackendRegistry, settings: Mapping[str, object]
) -> list[PlacementPreview]:
    try:
        return [PlacementPreview(placement, reason) for _, placement, reason in _plans(card, nodes, request, backends, settings)]
    except PlacementError as exc:
        return [PlacementPreview(None, str(exc))]
