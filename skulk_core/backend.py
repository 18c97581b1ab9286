"""The backend contract: what a backend plugin registers and what its engines do.

A backend loads a *shard* (a contiguous layer range, or the whole model) and returns an
:class:`Engine`. The core owns the loop around engines: it batches requests, moves activations
between stages, samples from the last stage's logits and detokenizes, so every backend and every
placement samples identically.

One engine step advances several sequences at once (continuous batching). A chunk holding many
positions is a prefill, a chunk holding one is a decode step; an engine may get both in one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

import numpy as np
from attrs import field, frozen

from skulk_core.model import ModelCard, ModelFiles
from skulk_core.placement import BackendSite, ShardRange
from skulk_core.tensor import Tensor
from skulk_core.threads import EngineThread

S = TypeVar("S")  # a backend's settings class
K = TypeVar("K")  # what an engine names its kept caches by

if TYPE_CHECKING:
    from skulk_core.sampling import SampledToken, Sampler


@frozen
class BackendCapabilities:
    """What a backend can do, read by placement before anything is loaded."""

    formats: frozenset[str] = field(converter=frozenset)  # "gguf", "safetensors"
    layer_ranges: bool  # can run a partial layer range, so it can be one stage of a pipeline
    devices: tuple[str, ...] = field(converter=tuple)  # devices usable on this node: "cpu", "cuda", ...
    batching: bool = False  # advances several sequences in one step
    embeddings: bool = False  # whole-model engines may compute embeddings
    architectures: frozenset[str] | None = field(
        default=None, converter=lambda v: None if v is None else frozenset(v)
    )  # None: any architecture the format allows
    # What a transformer block costs this backend beyond its matrix multiplications, as a fraction
    # of them (norms, rotary embedding, attention over the context, per-operation dispatch). The
    # builtin placement weighs the output head against blocks with it: head MACs over block MACs
    # times (1 + block_overhead).
    block_overhead: float = 0.0


@frozen
class EngineOptions:
    """How to load a shard. ``settings`` holds the backend's own config section, if it has one."""

    context_length: int
    max_sequences: int = 8
    threads: int | None = None  # None: the backend's default
    device: str | None = None  # None: the best device the backend finds
    settings: object | None = None

    def settings_as(self, cls: type[S], section: str) -> S:
        """``settings`` as the backend's section class ``cls`` (see :func:`section_settings`)."""
        return section_settings(self.settings, cls, section)


def section_settings(value: object | None, cls: type[S], section: str) -> S:
    """A backend's config section ``value`` as its class ``cls`` (section ``section``): None gives
    the defaults, a mapping is taken as the section's fields."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**dict(value))
    raise TypeError(f"{section} settings must be a {cls.__name__} or a mapping, got {type(value).__name__}")


@frozen
class SequenceChunk:
    """Positions ``[position, position + n)`` of one request's sequence, fed to one stage.

    The first stage gets ``tokens``; later stages get ``hidden`` (shape ``(n, hidden_size)``), the
    previous stage's output for the same positions. ``position`` is where the chunk starts in the
    sequence; everything before it is already in the engine's KV cache for ``request_id``.

    A prompt being scored (a client asked for its tokens' log-probabilities) has ``score_targets``:
    the token that follows each of the chunk's first ``len(score_targets)`` positions. The last stage
    then returns, for each of those positions, the target's log-probability and the ``score_top``
    most likely tokens there (:func:`skulk_core.score_token` on that position's logits), in
    :attr:`StageOutput.scores`.
    """

    request_id: str
    position: int
    tokens: tuple[int, ...] | None = field(default=None, converter=lambda t: None if t is None else tuple(t))
    hidden: Tensor | None = None
    want_logits: bool = True  # the last stage returns logits for the chunk's last position
    score_targets: tuple[int, ...] = field(default=(), converter=tuple)
    score_top: int = 0

    @property
    def length(self) -> int:
        if self.tokens is not None:
            return len(self.tokens)
        if self.hidden is not None:
            return self.hidden.shape[0]
        return 0


@frozen
class StageOutput:
    """What one stage produced for one chunk: ``hidden`` (not last stage) or ``logits`` (last).

    A chain whose last stage samples (see :mod:`skulk_core.instances`) gives ``sampled`` instead
    of ``logits``: the token, drawn there by the request's own seeded sampler. ``scores`` answers
    a chunk's ``score_targets``, one per target, in order."""

    request_id: str
    hidden: Tensor | None = None
    logits: np.ndarray | None = field(default=None, eq=False, repr=False)  # float32, (vocab_size,)
    sampled: SampledToken | None = None
    scores: tuple[SampledToken, ...] = field(default=(), converter=tuple)


@runtime_checkable
class Tokenizer(Protocol):
    """The model's own tokenizer, provided by the backend that runs the first stage."""

    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Tokens for ``text``; ``add_special`` adds BOS where the model wants it."""

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token may hold part of a UTF-8 character)."""

    def is_control(self, token_id: int) -> bool:
        """True for control tokens (BOS, EOS, chat markers) that are never shown as text."""


@runtime_checkable
class Engine(Protocol):
    """A loaded shard. Methods are called from one task at a time; blocking compute inside them
    must run off the event loop, best on an :class:`skulk_core.EngineThread`, which starts a step
    before the event loop turns to other work: the engine's own, or on a CPU with OpenMP the one
    every CPU engine of the process shares (:func:`skulk_core.compute_thread`)."""

    shard: ShardRange
    context_length: int  # positions per sequence
    max_sequences: int  # sequences that may hold KV cache at once
    tokenizer: Tokenizer | None  # set on the first stage

    async def step(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        """Run every chunk through this shard's layers, in one batch where the engine can.

        Returns one output per chunk, in order. Each chunk extends its request's KV cache.
        """

    async def release(self, request_id: str) -> None:
        """Forget ``request_id``'s KV cache (finished, cancelled, or its client went away)."""

    async def close(self) -> None:
        """Free everything the engine holds."""


@runtime_checkable
class BlockingStepEngine(Protocol):
    """Optionally implemented by an engine: :meth:`Engine.step` for a caller on a thread of its own,
    blocking until the step is done. A direct stage link (:mod:`skulk_core.links`) steps a stage
    this way from the thread that read the step, so the event loop is not on a pipeline hop. It
    must run the step where ``step`` runs it, in order with the engine's other calls (on an
    :class:`skulk_core.EngineThread`: ``thread.call(...)``). Engines without it are stepped through
    the event loop.

    Such an engine may also name that thread as ``step_thread`` (an ``EngineThread``; see
    :func:`step_thread`). The core then does a hop's own work there as well, right after the step
    and before anything else is queued: a pipeline stage's activations are encoded and written to
    the next stage's link, and the last stage samples, without waiting for another thread to wake
    (``thread.call`` from the thread itself runs the call at once)."""

    def step_blocking(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]: ...


def step_thread(engine: object) -> EngineThread | None:
    """The :class:`skulk_core.EngineThread` a :class:`BlockingStepEngine` steps on, where it names it
    (``step_thread``); None otherwise."""
    thread = getattr(engine, "step_thread", None)
    return thread if isinstance(thread, EngineThread) and isinstance(engine, BlockingStepEngine) else None


@runtime_checkable
class DrawingEngine(Protocol):
    """Optionally implemented by a whole-model engine: :meth:`Engine.step`, drawing each chunk's next
    token on the engine's own thread right after the step, while its logits are still in the caches.

    For every chunk that gives logits, the engine calls ``samplers[request_id].draw(logits)``
    (:meth:`skulk_core.Sampler.draw`) if the request has a sampler there. ``logits`` may be a view
    of the engine's own memory, valid only during the call: the sampler keeps nothing of it, so the
    engine need not copy the vocabulary's logits. A token drawn gives ``StageOutput(request_id,
    sampled=token)``; a request without a sampler, or one whose ``draw`` returns None, gets its
    logits as from ``step``. The scheduler then takes the token (:meth:`~skulk_core.Sampler.observe`)
    on the event loop. The core uses it for an instance of one stage on this node.

    The engine may decode a request's next step ahead, before it is asked for, when the sampler's
    :attr:`~skulk_core.Sampler.draws_ahead` allows it; a step then asked for differently is undone
    (its KV cache cut back, :meth:`~skulk_core.Sampler.restore`). See docs/hooks.md."""

    async def step_and_draw(self, batch: Sequence[SequenceChunk], samplers: Mapping[str, Sampler]) -> list[StageOutput]: ...


def draw_outputs(outputs: Sequence[StageOutput], samplers: Mapping[str, Sampler]) -> list[StageOutput]:
    """``outputs`` with the next token drawn wherever a request has logits and a sampler in
    ``samplers`` (see :class:`DrawingEngine`): for an engine whose step already returns logits
    arrays of its own, ``step_and_draw`` is this, run on its thread right after the step."""
    drawn = []
    for output in outputs:
        sampler = samplers.get(output.request_id) if output.logits is not None else None
        sampled = sampler.draw(output.logits) if sampler is not None else None
        drawn.append(output if sampled is None else StageOutput(output.request_id, sampled=sampled, scores=output.scores))
    return drawn


@runtime_checkable
class PrefixCachingEngine(Protocol):
    """Optionally implemented by a whole-model engine: it keeps a released request's KV cache
    (while it has room), so that a new request whose prompt begins the same way starts from it. A
    chat's next turn repeats the conversation so far; several questions share an instruction.

    The engine must know which tokens each kept cache holds. It evicts kept caches (the least
    recently used first) only when a new request needs their room."""

    async def reuse(self, request_id: str, prompt: Sequence[int]) -> int:
        """Give ``request_id``, new to the engine, the kept cache that shares the longest start
        with ``prompt``, cut back to that start, and return its length: how many of ``prompt``'s
        positions are in the cache already, at most ``len(prompt) - 1`` (the last position is
        computed for its logits). 0, and nothing taken, when no kept cache begins like ``prompt``."""


def shared_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """How many tokens ``a`` and ``b`` share from their start, counting at most ``limit`` (default:
    the shorter one's length): what a kept cache (:class:`PrefixCachingEngine`) has of a prompt."""
    n = min(len(a), len(b)) if limit is None else min(limit, len(a), len(b))
    if n <= 0:
        return 0
    if n > 8:  # numpy's calls cost more than a short loop
        differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
        return int(differ[0]) if differ.size else n
    for index in range(n):
        if a[index] != b[index]:
            return index
    return n


def best_kept(kept: Iterable[tuple[K, Sequence[int], int]], prompt: Sequence[int]) -> tuple[K, int] | None:
    """Which kept cache a new request with ``prompt`` takes (:class:`PrefixCachingEngine`), and how
    many of its positions: ``kept`` holds (key, the tokens the cache holds, positions cached), the
    most recently kept last. The longest shared start wins (at most ``len(prompt) - 1``: the last
    position is computed for its logits; the most recently kept among equals). Taking a cache cuts
    what follows the shared part, so only a cache that shares at least half of its tokens is taken
    (a conversation going on, or its last turn asked again), never another conversation's that
    merely begins with the same system prompt. None when no cache qualifies."""
    limit = len(prompt) - 1
    best: tuple[K, int] | None = None
    for key, tokens, cached in reversed(list(kept)):
        length = shared_prefix(tokens, prompt, min(limit, cached))
        if length > (best[1] if best else 0) and 2 * length >= len(tokens):
            best = (key, length)
    return best


@runtime_checkable
class EmbeddingEngine(Protocol):
    """Optionally implemented by whole-model engines whose backend declares ``embeddings``."""

    async def embed(self, tokens: Sequence[int]) -> list[float]:
        """One pooled, L2-normalised embedding for ``tokens``."""


@runtime_checkable
class TokenizerLoader(Protocol):
    """Optionally implemented by a backend: a tokenizer without the weights, so a node that is not
    the head of a pipeline can still render chat and count tokens for requests it forwards."""

    async def load_tokenizer(self, card: ModelCard, files: ModelFiles) -> Tokenizer: ...


@runtime_checkable
class MemorySiteReporter(Protocol):
    """Optionally implemented by a backend whose stages live outside the node's system memory (a
    GPU): where, and how many bytes are free there, for placement to size its stages by. Called
    with the backend's config section (or None) for every heartbeat's resources, so it must be
    cheap (cache what it reads for a few seconds). None: the stages live in system memory."""

    def memory_site(self, settings: object | None) -> BackendSite | None: ...


@runtime_checkable
class Backend(Protocol):
    """What a backend factory returns. Constructing one must be cheap: heavy libraries are
    imported in :meth:`load`, not at import or construction time."""

    name: str
    capabilities: BackendCapabilities

    def supports(self, card: ModelCard) -> str | None:
        """None if this backend can run ``card``, else the reason it cannot (shown to users)."""

    def estimate_memory(self, card: ModelCard, shard: ShardRange, options: EngineOptions) -> int:
        """Bytes a loaded shard will hold: weights, KV cache for the options, runtime overhead."""

    async def load(
        self, card: ModelCard, files: ModelFiles, shard: ShardRange, options: EngineOptions
    ) -> Engine:
        """Load ``shard`` of the model from ``files`` and return a ready engine."""
