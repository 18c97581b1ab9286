"""The control-plane messages nodes exchange (see :mod:`skulk_core.wire` for the envelope)."""

from __future__ import annotations

from collections.abc import Mapping

from attrs import field, frozen

from skulk_core.backend import SequenceChunk
from skulk_core.cluster.state import ClusterState, LogEntry
from skulk_core.inference import GenerationChunk, GenerationRequest
from skulk_core.placement import NodeResources
from skulk_core.sampling import SampledToken, SamplingParams, TokenLogprob
from skulk_core.tensor import Tensor
from skulk_core.wire import message


@message("hello")
@frozen
class Hello:
    """First message on every connection, both ways."""

    node_id: str
    name: str
    version: str
    addresses: tuple[str, ...] = field(converter=tuple)  # where this node's transport listens
    api_url: str | None = None


@message("heartbeat")
@frozen
class Heartbeat:
    node_id: str
    uptime: float
    round: int
    master_id: str | None
    master_force: bool
    force_master: bool  # the sender itself asked to be master
    resources: NodeResources
    index: int  # last event the sender applied
    peers: Mapping[str, str] = field(factory=dict)  # node id -> transport address, for mesh forming


@message("elect")
@frozen
class Elect:
    round: int
    candidate_id: str
    candidate_force: bool
    proposer_id: str


@message("log_append")
@frozen
class LogAppend:
    round: int
    entries: tuple[LogEntry, ...] = field(converter=tuple)


@message("sync_request")
@frozen
class SyncRequest:
    index: int


@message("snapshot")
@frozen
class Snapshot:
    state: ClusterState


# -- commands to the master ----------------------------------------------------------------------


@message("command")
@frozen
class Command:
    """A request to the master; answered by :class:`CommandReply` with the same ``command_id``."""

    command_id: str
    action: str  # "place", "delete"
    model: str | None = None
    backend: str | None = None
    min_nodes: int = 1
    context_length: int | None = None
    max_sequences: int = 8
    instance_id: str | None = None


@message("command_reply")
@frozen
class CommandReply:
    command_id: str
    ok: bool
    instance_id: str | None = None
    error: str | None = None
    error_kind: str | None = None  # "placement", "model", "request"


@message("stage_report")
@frozen
class StageReport:
    """A stage node tells the master how loading its stage went."""

    instance_id: str
    status: str  # "loading", "ready", "failed: why"


# -- the compute plane: activations between stages ------------------------------------------------


@frozen
class RemoteSampling:
    """Sample ``request_id``'s tokens at the last stage, with these parameters (the seed resolved),
    from its next step on; only the sampled tokens travel back, not the logits."""

    request_id: str
    params: SamplingParams
    logprobs: bool = False


@message("stage_forward")
@frozen
class StageForward:
    """A step's chunks for stage ``stage_index`` of an instance; the last stage answers the
    ``origin`` (the head) with :class:`StageResult`."""

    instance_id: str
    step_id: str
    origin: str
    stage_index: int
    chunks: tuple[SequenceChunk, ...] = field(converter=tuple)
    samplers: tuple[RemoteSampling, ...] = field(converter=tuple, factory=tuple)  # passed on to the last stage


@message("stage_result")
@frozen
class StageResult:
    instance_id: str
    step_id: str
    outputs: tuple[WireOutput, ...] = field(converter=tuple, factory=tuple)
    error: str | None = None


@frozen
class WireOutput:
    """One chunk's result from the last stage: its logits, or (for a request sampled there) the
    token it sampled, with the log-probabilities asked for; and a scored prompt chunk's scores."""

    request_id: str
    logits: Tensor | None = None
    token: int | None = None
    logprob: float = 0.0
    top: tuple[TokenLogprob, ...] = field(converter=tuple, factory=tuple)
    scores: tuple[SampledToken, ...] = field(converter=tuple, factory=tuple)


@message("stage_release")
@frozen
class StageRelease:
    instance_id: str
    request_id: str


@message("link_request")
@frozen
class LinkRequest:
    """Ask for a direct link (:mod:`skulk_core.links`) to stage ``stage_index`` of an instance,
    sent by the node of the stage before it (the last stage's node, for the head)."""

    request_id: str
    instance_id: str
    stage_index: int


@message("link_offer")
@frozen
class LinkOffer:
    """Where to connect (``host:port``; a ``0.0.0.0`` host means the host this node was reached
    on) and the one-time token to present; or why not."""

    request_id: str
    address: str | None = None
    token: bytes = field(default=b"", repr=False)
    error: str | None = None


# -- the data plane: generated tokens back to the node that took the request ----------------------


@message("generate")
@frozen
class GenerateForward:
    stream_id: str
    request: GenerationRequest


@message("stream_chunk")
@frozen
class StreamChunk:
    stream_id: str
    chunk: GenerationChunk


@message("stream_end")
@frozen
class StreamEnd:
    stream_id: str
    error: str | None = None
    error_kind: str | None = None  # "request", "lost", "not_ready", "error"
    param: str | None = None
    code: str | None = None


@message("stream_cancel")
@frozen
class StreamCancel:
    stream_id: str
