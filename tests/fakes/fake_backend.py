"""A fake backend plugin, for placement tests: it registers the backend ``fake``, which sizes a shard
as exactly ``layer_bytes() * layers`` (half that for a GPU device, as a backend holding
half-precision weights there would; divided by ``divide`` from its config section, as a backend
holding quantized weights would) and cannot load anything (no real backend runs here).

Load it with ``--plugin tests/fakes/fake_backend.py``.
"""

from __future__ import annotations

from skulk_core import BackendCapabilities, BackendError, BackendSite, hookimpl


class FakeBackend:
    name = "fake"
    capabilities = BackendCapabilities(formats={"gguf"}, layer_ranges=True, devices=("cpu",))

    def supports(self, card):  # type: ignore[no-untyped-def]
        return None if card.format == "gguf" else f"the fake backend reads GGUF only, not {card.format}"

    def estimate_memory(self, card, shard, options):  # type: ignore[no-untyped-def]
        on_gpu = (options.device or "cpu").startswith("cuda")
        # its config section, as a dict: {"divide": N} holds a layer in 1/N of the bytes (quantized)
        divide = options.settings.get("divide", 1) if isinstance(options.settings, dict) else 1
        return card.layer_bytes() * shard.layer_count // (2 if on_gpu else 1) // divide

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


class FakeGpuBackend(FakeBackend):
    """Like ``fake``, but its stages live on a (fake) GPU: ``memory_site`` reports 2 GiB free on
    ``cuda:0``, or the device its config section names (a ``{"device": ...}`` mapping)."""

    name = "fake-gpu"
    capabilities = BackendCapabilities(formats={"gguf"}, layer_ranges=True, devices=("cuda", "cpu"))

    def memory_site(self, settings):  # type: ignore[no-untyped-def]
        device = (settings or {}).get("device", "cuda:0")
        if device == "broken":
            raise RuntimeError("the fake GPU cannot be read")
        return None if device == "cpu" else BackendSite(device, 2 * 1024**3)


@hookimpl
def skulk_register_backends(registry):  # type: ignore[no-untyped-def]
    registry.add("fake", FakeBackend)
    registry.add("fake-whole", FakeWholeModelBackend)
    registry.add("fake-slow-blocks", FakeSlowBlocksBackend)
    registry.add("fake-gpu", FakeGpuBackend)
