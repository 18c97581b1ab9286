"""Sampling, done by the core for every backend and placement, so the same request and seed give
the same tokens wherever the model runs.

Order of operations on one logits vector: logit bias, presence/frequency penalties, then (unless
greedy) temperature, top-k, min-p and top-p filtering, then a draw from the request's own seeded
generator. Log-probabilities reported to clients are those of the model's distribution after bias
and penalties, before temperature and filtering (what OpenAI reports), and before any constraint.

A request with a constraint (JSON mode, :mod:`skulk_core.constraints`) is masked lazily, as
llama.cpp applies a grammar: the candidate the sampler would pick is checked, and only a rejected
one costs more. Greedy takes the most likely allowed token; a draw that lands on a forbidden token
is drawn again with that token removed (which samples exactly the allowed part of the
distribution), up to ``MAX_REDRAWS`` times, then the most likely allowed token is taken. Every
choice depends only on the logits and the request's generator, so seeds stay reproducible.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping

import attrs
import numpy as np
from attrs import field, frozen

from skulk_core.constraints import TokenConstraint
from skulk_core.errors import ModelError, RequestError

MAX_REDRAWS = 8  # draws that may land on tokens a constraint forbids before the best allowed is taken
FIRST_CANDIDATES = 16  # a constrained greedy step checks the best 16 tokens, then 16 times more


def _check_range(low: float, high: float) -> object:
    def check(_: object, attribute: object, value: float) -> None:
        if not low <= value <= high:
            raise RequestError(f"{attribute.name} must be between {low} and {high}, got {value}", param=attribute.name)  # type: ignore[attr-defined]

    return check


@frozen
class SamplingParams:
    temperature: float = field(default=1.0, validator=_check_range(0.0, 2.0))
    top_p: float = field(default=1.0, validator=_check_range(0.0, 1.0))
    top_k: int = field(default=0, validator=_check_range(0, 1 << 20))  # 0: no top-k
    min_p: float = field(default=0.0, validator=_check_range(0.0, 1.0))
    presence_penalty: float = field(default=0.0, validator=_check_range(-2.0, 2.0))
    frequency_penalty: float = field(default=0.0, validator=_check_range(-2.0, 2.0))
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(factory=dict)
    top_logprobs: int = field(default=0, validator=_check_range(0, 20))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@frozen
class TokenLogprob:
    token_id: int
    logprob: float


@frozen
class SampledToken:
    token_id: int
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def most_likely(logprobs: np.ndarray, k: int) -> tuple[TokenLogprob, ...]:
    """The ``k`` most likely tokens of ``logprobs``, best first (the lower id first among equals)."""
    if k <= 0:
        return ()
    k = min(k, logprobs.shape[0])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.lexsort((idx, -logprobs[idx]))]
    return tuple(TokenLogprob(int(i), float(logprobs[i])) for i in idx)


def score_token(logits: np.ndarray, token_id: int, top: int = 0) -> SampledToken:
    """How likely the model found ``token_id`` at the position whose ``logits`` these are: its
    log-probability and the ``top`` most likely tokens there (prompt scoring, see
    :class:`skulk_core.SequenceChunk`). The model's own distribution: no request's bias, penalty,
    temperature or constraint applies to a prompt. ``logits`` may be a view of an engine's memory;
    nothing of it is kept."""
    logprobs = log_softmax(np.asarray(logits, dtype=np.float32))
    return SampledToken(int(token_id), float(logprobs[token_id]), most_likely(logprobs, top))


class Sampler:
    """Samples one request's tokens; holds its seeded generator and the counts for penalties."""

    def __init__(self, params: SamplingParams, constraint: TokenConstraint | None = None, *, logprobs: bool = False) -> None:
        self.params = params
        self.constraint = constraint
        self.logprobs = logprobs  # the request wants its tokens' log-probabilities (a copy elsewhere needs to know)
        # The seed in force: drawn when the request gave none, so that a sampler made elsewhere from
        # ``resolved_params`` (the last stage of a pipeline) draws exactly the same tokens.
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._counts: Counter[int] = Counter()
        self._bias: tuple[np.ndarray, np.ndarray] | None = None  # logit_bias as (ids, float32 values)

    def sample(self, logits: np.ndarray, *, want_logprobs: bool = False) -> SampledToken:
        sampled = self._next(logits, want_logprobs)
        self._taken(sampled.token_id)
        return sampled

    def draw(self, logits: np.ndarray) -> SampledToken | None:
        """The token :meth:`sample` would give now (with log-probabilities if the request asked for
        them), without taking it: :meth:`observe` takes it. An engine calls this on its own thread
        (:class:`skulk_core.DrawingEngine`), where ``logits`` are still in the caches, and may pass a
        view of its own memory: nothing here keeps ``logits``. None under a constraint, whose
        state is the event loop's: such a sampler samples there."""
        if self.constraint is not None:
            return None
        return self._next(logits, self.logprobs)

    def _next(self, logits: np.ndarray, want_logprobs: bool) -> SampledToken:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        penalised = bool(self._counts) and bool(p.presence_penalty or p.frequency_penalty)
        if p.greedy and not penalised and not want_logprobs and not p.top_logprobs:
            # The usual case: no copy of the whole vocabulary to change a few logits.
            token = _argmax_biased(logits, self._bias_for(logits.shape[0]))
            if self.constraint is None or self.constraint.allows(token):
                return SampledToken(token, 0.0)
        if p.logit_bias or penalised:
            logits = logits.copy()
            bias_ids, bias = self._bias_for(logits.shape[0])
            logits[bias_ids] += bias
            if penalised:
                ids = np.fromiter(self._counts.keys(), dtype=np.int64)
                counts = np.fromiter(self._counts.values(), dtype=np.float32)
                logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        token = self._choose(logits)
        if not want_logprobs and not p.top_logprobs:
            return SampledToken(token, 0.0)
        logprobs = log_softmax(logits)
        return SampledToken(token, float(logprobs[token]), most_likely(logprobs, p.top_logprobs))

    @property
    def draws_ahead(self) -> bool:
        """Whether :meth:`draw` may run before the previous token is observed and give the same
        token: no constraint and no penalties, so the draw depends only on the logits and the
        generator. An engine may then draw a step before the scheduler asks for it (see
        :class:`skulk_core.DrawingEngine`), rewinding with :meth:`checkpoint` and :meth:`restore`
        if that step is not taken."""
        p = self.params
        return self.constraint is None and not (p.presence_penalty or p.frequency_penalty)

    def checkpoint(self) -> object:
        """What :meth:`restore` needs to undo the draws after this call (the generator's state;
        nothing for greedy decoding, which draws nothing at random)."""
        return None if self.params.greedy else self._rng.bit_generator.state

    def restore(self, checkpoint: object) -> None:
        """Undo the draws made since :meth:`checkpoint` returned ``checkpoint``."""
        if checkpoint is not None:
            self._rng.bit_generator.state = checkpoint

    @property
    def resolved_params(self) -> SamplingParams:
        """These parameters with the seed in force."""
        return attrs.evolve(self.params, seed=self.seed)

    def observe(self, token: int) -> None:
        """Take a token drawn elsewhere: by :meth:`draw`, or by a copy of this sampler at the last
        stage of a pipeline. Penalties and the constraint here stay in step."""
        self._taken(token)

    def _taken(self, token: int) -> None:
        self._counts[token] += 1
        if self.constraint is not None:
            self.constraint.advance(token)

    def _choose(self, logits: np.ndarray) -> int:
        """The next token from the biased and penalised ``logits``, within the constraint."""
        constraint = self.constraint
        if self.params.greedy:
            return int(np.argmax(logits)) if constraint is None else self._best_allowed(logits)
        if constraint is None:
            return self._draw(logits)
        masked = logits
        for _ in range(MAX_REDRAWS):
            token = self._draw(masked)
            if constraint.allows(token):
                return token
            if masked is logits:
                masked = logits.copy()
            masked[token] = -np.inf
            if np.max(masked) == -np.inf:
                break
        return self._best_allowed(masked)

    def _best_allowed(self, logits: np.ndarray) -> int:
        """The most likely token the constraint allows (the lowest id among equals).

        Candidates are checked in descending order, in blocks of growing size: a block holds every
        token at least as likely as its k-th best, so each block extends the previous one in the
        same order, and only a step where the best tokens all fail sorts more of the vocabulary.
        """
        assert self.constraint is not None
        allows = self.constraint.allows
        vocab = logits.shape[0]
        checked = 0
        k = FIRST_CANDIDATES
        while True:
            if k >= vocab:
                block = np.arange(vocab)
            else:
                kth = np.partition(logits, vocab - k)[vocab - k]
                block = np.flatnonzero(logits >= kth)
            order = block[np.lexsort((block, -logits[block]))]
            for token in order[checked:].tolist():
                if allows(token):
                    return token
            if k >= vocab:
                raise ModelError(
                    "no token of the model's vocabulary can continue the constrained output; "
                    "the request cannot be answered in this response format"
                )
            checked = len(order)
            k *= 16

    def _bias_for(self, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """The request's logit bias as (token ids within the vocabulary, float32 biases), made once."""
        if self._bias is None:
            valid = sorted(t for t in self.params.logit_bias if 0 <= t < vocab)
            self._bias = (np.array(valid, dtype=np.int64), np.array([self.params.logit_bias[t] for t in valid], dtype=np.float32))
        return self._bias

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        probs = logits / max(p.temperature, 1e-5)  # the one full-size temporary: worked in place
        vocab = probs.shape[0]
        probs -= np.max(probs)
        np.exp(probs, out=probs)
        probs /= probs.sum()
        # Candidates in the order HF's warpers apply: top-k, then min-p, then top-p over the
        # renormalised rest. Sorting all 49k+ tokens costs ~6 ms, so top-p alone looks at the
        # smallest top-k block that already holds the requested mass.
        candidates: np.ndarray | None = None
        if 0 < p.top_k < vocab:
            candidates = np.argpartition(-probs, p.top_k - 1)[: p.top_k]
        elif p.top_p < 1.0:
            k = 256
            while k < vocab:
                block = np.argpartition(-probs, k - 1)[:k]
                if probs[block].sum() >= p.top_p:
                    candidates = block
                    break
                k *= 4
        if p.min_p > 0.0:
            pool = np.arange(vocab) if candidates is None else candidates
            candidates = pool[probs[pool] >= p.min_p * probs[pool].max()]
        if candidates is None:
            if p.top_p >= 1.0:
                return _draw_from(probs, self._rng)
            candidates = np.arange(vocab)
        candidates = candidates[np.lexsort((candidates, -probs[candidates]))]
        kept = probs[candidates] / probs[candidates].sum()
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(kept), p.top_p, side="left")) + 1
            kept = kept[:cut] / kept[:cut].sum()
        return int(candidates[_draw_from(kept, self._rng)])


def _argmax_biased(logits: np.ndarray, bias: tuple[np.ndarray, np.ndarray]) -> int:
    """``np.argmax(logits + bias)`` (the first of equal maxima) without copying ``logits``."""
    best = int(np.argmax(logits))
    ids, offsets = bias
    if not ids.size:
        return best
    values = logits[ids] + offsets  # float32, as adding the bias to the whole vector would be
    if np.isnan(logits[best]) or np.isnan(values).any():
        changed = logits.copy()
        changed[ids] = values
        return int(np.argmax(changed))
    if (ids == best).any():  # rare: the model's favourite was biased; find the best unbiased one
        unbiased = logits.copy()
        unbiased[ids] = -np.inf
        best = int(np.argmax(unbiased))
        if (ids == best).any():  # every token is biased (or the rest are -inf)
            return int(ids[np.argmax(values)])
    top = int(np.argmax(values))  # ids are sorted: the first of equal maxima is the lowest id
    if values[top] > logits[best] or (values[top] == logits[best] and ids[top] < best):
        return int(ids[top])
    return best


DRAW_BLOCK = 512


def _draw_from(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One index drawn with probability proportional to ``probs`` (non-negative, not all zero).

    The inverse CDF, found in two levels (sums of blocks, then within one block) so that a draw over
    a 49k vocabulary does not build a 49k cumulative sum: ``Generator.choice`` also validates the
    whole vector in float64 on every call, which costs about a millisecond per token.
    """
    size = probs.shape[0]
    if size <= DRAW_BLOCK:
        cdf = np.cumsum(probs, dtype=np.float64)
        index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        return _last_possible(probs, min(index, size - 1))
    starts = np.arange(0, size, DRAW_BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(probs, starts, dtype=np.float64))
    target = rng.random() * block_cdf[-1]
    block = min(int(np.searchsorted(block_cdf, target, side="right")), len(starts) - 1)
    start = block * DRAW_BLOCK
    inner = np.cumsum(probs[start : start + DRAW_BLOCK], dtype=np.float64)
    inner += block_cdf[block - 1] if block else 0.0
    index = start + min(int(np.searchsorted(inner, target, side="right")), len(inner) - 1)
    return _last_possible(probs, index)


def _last_possible(probs: np.ndarray, index: int) -> int:
    """``index``, or when rounding landed on a token of probability zero, the nearest possible one
    before it (or after it)."""
    if probs[index] > 0:
        return index
    before = np.flatnonzero(probs[:index] > 0)
    if before.size:
        return int(before[-1])
    return int(np.flatnonzero(probs > 0)[0])
