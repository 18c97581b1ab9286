"""Sampling, done by the core for every backend and placement, so the same request and seed give
the same tokens wherever the model runs.

Order of operations on one logits vector: logit bias, presence/frequency penalties, then (unless
greedy) temperature, top-k, min-p and top-p filtering, then a draw from the request's own seeded
generator. Log-probabilities reported to clients are those of the model's distribution after bias
and penalties, before temperature and filtering (what OpenAI reports).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping

import numpy as np
from attrs import field, frozen

from skulk_core.errors import RequestError


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


class Sampler:
    """Samples one request's tokens; holds its seeded generator and the counts for penalties."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._counts: Counter[int] = Counter()

    def sample(self, logits: np.ndarray, *, want_logprobs: bool = False) -> SampledToken:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if p.logit_bias or (self._counts and (p.presence_penalty or p.frequency_penalty)):
            logits = logits.copy()
            for token, bias in p.logit_bias.items():
                if 0 <= token < logits.shape[0]:
                    logits[token] += bias
            if p.presence_penalty or p.frequency_penalty:
                ids = np.fromiter(self._counts.keys(), dtype=np.int64)
                counts = np.fromiter(self._counts.values(), dtype=np.float32)
                logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        if p.greedy:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits)
        self._counts[token] += 1
        if not want_logprobs and not p.top_logprobs:
            return SampledToken(token, 0.0)
        logprobs = log_softmax(logits)
        top: tuple[TokenLogprob, ...] = ()
        if p.top_logprobs:
            k = min(p.top_logprobs, logprobs.shape[0])
            idx = np.argpartition(-logprobs, k - 1)[:k]
            idx = idx[np.lexsort((idx, -logprobs[idx]))]
            top = tuple(TokenLogprob(int(i), float(logprobs[i])) for i in idx)
        return SampledToken(token, float(logprobs[token]), top)

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        scaled = logits / max(p.temperature, 1e-5)
        vocab = scaled.shape[0]
        probs = np.exp(scaled - np.max(scaled))
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
                return int(self._rng.choice(vocab, p=probs))
            candidates = np.arange(vocab)
        candidates = candidates[np.lexsort((candidates, -probs[candidates]))]
        kept = probs[candidates] / probs[candidates].sum()
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(kept), p.top_p, side="left")) + 1
            kept = kept[:cut] / kept[:cut].sum()
        return int(candidates[self._rng.choice(len(kept), p=kept)])
