"""Stage chains: the path a batch takes from tokens to logits through one or more engines.

The scheduler (:mod:`skulk_core.inference`) talks to a chain, never to engines directly, so a model
on one node and a model split over several look the same to it. ``LocalChain`` runs engines loaded
in this process one after another, handing each stage's activations to the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import anyio
from attrs import evolve

from skulk_core.backend import Engine, PrefixCachingEngine, SequenceChunk, StageOutput
from skulk_core.errors import BackendError

if TYPE_CHECKING:
    from skulk_core.sampling import Sampler


class StageChain(Protocol):
    async def step(self, batch: Sequence[SequenceChunk], samplers: Mapping[str, Sampler] | None = None) -> list[StageOutput]:
        """Run token chunks through every stage; the outputs carry the last stage's logits.

        ``samplers`` are the requests' own samplers: a chain whose last stage is elsewhere may
        sample there with a copy (same parameters and seed) and return ``sampled`` tokens instead
        of logits, which then never cross the network."""

    async def release(self, request_id: str) -> None: ...

    async def reuse(self, request_id: str, prompt: Sequence[int]) -> int:
        """Positions of ``prompt`` already cached for ``request_id`` from an earlier request
        (:class:`skulk_core.PrefixCachingEngine`); 0 where the chain cannot reuse caches."""

    async def close(self) -> None: ...


class LocalChain:
    """Engines in this process, in pipeline order."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("a chain needs at least one engine")
        self.engines = list(engines)
        # One step at a time per chain; embeddings take it too. fast_acquire: an uncontended step starts
        # without first yielding to every other ready task (see skulk_core.threads).
        self.lock = anyio.Lock(fast_acquire=True)

    @property
    def head(self) -> Engine:
        return self.engines[0]

    async def step(self, batch: Sequence[SequenceChunk], samplers: Mapping[str, Sampler] | None = None) -> list[StageOutput]:
        async with self.lock:
            chunks = list(batch)
            outputs: list[StageOutput] = []
            for index, engine in enumerate(self.engines):
                outputs = await engine.step(chunks)
                if len(outputs) != len(chunks):
                    raise BackendError(f"stage {index} returned {len(outputs)} outputs for {len(chunks)} chunks")
                if index + 1 < len(self.engines):
                    chunks = [
                        evolve(chunk, tokens=None, hidden=out.hidden) for chunk, out in zip(chunks, outputs)
                    ]
            return outputs

    async def release(self, request_id: str) -> None:
        for engine in self.engines:
            await engine.release(request_id)

    async def reuse(self, request_id: str, prompt: Sequence[int]) -> int:
        """A kept cache for ``request_id`` where the chain is one engine that keeps them."""
        engine = self.engines[0]
        if len(self.engines) > 1 or not isinstance(engine, PrefixCachingEngine):
            return 0
        async with self.lock:
            return await engine.reuse(request_id, prompt)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            for engine in self.engines:
                await engine.close()
