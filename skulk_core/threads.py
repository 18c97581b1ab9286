"""A dedicated thread for an engine's blocking calls.

``anyio.to_thread.run_sync`` yields to the event loop before it hands its call to a worker, so every
task that became ready meanwhile runs first. For an engine step that is the wrong order: the
scheduler has just sampled the tokens of step *k* and woken the clients' streams, and those streams
(JSON, HTTP framing, socket writes) would run before step *k + 1* starts, adding their time to every
token. :meth:`EngineThread.run` queues the call before it yields, so the next step computes while the
event loop sends the previous step's tokens. One long-lived thread per engine also keeps the native
library's per-thread state (OpenMP teams, torch's thread pool) warm from call to call.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

_STOP = object()


class EngineThread:
    """Runs blocking calls one after another, in the order they were submitted, on one thread.

    A caller that is cancelled while its call runs waits for the call to finish (the call mutates
    engine state that the next call needs consistent), as ``anyio.to_thread.run_sync`` does by
    default. The thread starts on the first call and ends on :meth:`close`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): anyio's own hand-off
            return await anyio.to_thread.run_sync(func, *args)
        future: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((func, args, loop, future))  # before any await: the call starts now
        with anyio.CancelScope(shield=True):
            return await future

    @property
    def closed(self) -> bool:
        return self._closed

    async def run_last(self, func: Callable[[], object]) -> None:
        """Run ``func`` after the calls already queued, as the last call, then close; nothing if
        closed already (an engine's ``close``, safe to call twice). Shielded: it always finishes."""
        if self._closed:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.run(func)
            finally:
                self.close()

    def close(self) -> None:
        """Let the thread end once the calls already queued have run (never blocks)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            func, args, loop, future = item
            try:
                result = func(*args)
            except BaseException as exc:  # handed to the caller, raised there
                _deliver(loop, future, None, exc)
            else:
                _deliver(loop, future, result, None)


def _deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the loop is closed: nobody waits for this call any more
