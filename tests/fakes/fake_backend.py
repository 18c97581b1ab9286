"""A fake backend plugin, for placement tests: it registers the backend ``fake``, which sizes a shard
as exactly ``layer_bytes() * layers`` and cannot load anything (no real backend runs here).

Load it with ``--plugin tests/fakes/fake_backend.py``.
"""

from __future__ import annotations

from skulk_core import BackendCapabilities, BackendError, hookimpl


class FakeBackend:
    name = "fake"
    capabilities = BackendCapabilities(formats={"gguf"}, layer_ranges=True, devices=("cpu",))

    def supports(self, card):  # type: ignore[no-untyped-def]
        return None if card.format == "gguf" else f"the fake backend reads GGUF only, not {card.format}"

    def estimate_memory(self, card, shard, options):  # type: ignore[no-untyped-def]
        return card.layer_bytes() * shard.layer_count

    async def load(self, card, files, shard, options):  # type: ignore[no-untyped-def]
        raise BackendError("the fake backend loads nothing")


class FakeWholeModelBackend(FakeBackend):
    """Like ``fake``, but it can only run a whole model (no layer ranges)."""

    name = "fake-whole"
    capabilities = BackendCapabilities(formats={"gguf"}, layer_ranges=False, devices=("cpu",))


class FakeSlowBlocksBackend(FakeBackend):
    """Like ``fake``, but its blocks cost it twice their matrix multiplications (for placement)."""

    name = "fake-slow-blocks"
    capabilities = BackendCapabilities(formats={"gguf"}, layer_ranges=True, devices=("cpu",), block_overhead=1.0)


@hookimpl
def skulk_register_backends(registry):  # type: ignore[no-untyped-def]
    registry.add("fake", FakeBackend)
    registry.add("fake-whole", FakeWholeModelBackend)
    registry.add("fake-slow-blocks", FakeSlowBlocksBackend)
