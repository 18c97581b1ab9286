"""A dedicated thread for an engine's blocking calls.

``anyio.to_thread.run_sync`` yields to the event loop before it hands its call to a worker, so every
task that became ready meanwhile runs first. For an engine step that is the wrong order: the
scheduler has just sampled the tokens of step *k* and woken the clients' streams, and those streams
(JSON, HTTP framing, socket writes) would run before step *k + 1* starts, adding their time to every
token. :meth:`EngineThread.run` queues the call before it yields, so the next step computes while the
event loop sends the previous step's tokens. One long-lived thread per engine also keeps the native
library's per-thread state (OpenMP teams, torch's thread pool) warm from call to call.

**Few threads for CPU compute.** llama.cpp and torch parallelise with OpenMP, and GNU OpenMP gives
each thread that starts a parallel region a team of its own, kept while that thread lives. Once the
threads it manages outnumber the CPUs, it stops spinning at barriers, and every parallel region then
sleeps and wakes its threads: one idle thread that once ran a llama.cpp decode (an embedding, say)
halved another thread's decode on this project's 2-core VM (170 -> 90 tokens/s, the default model,
2 threads each), and one idle thread that once ran a torch product took a torch step from 8 to 14 ms.
So CPU engines share :func:`compute_thread`, one per process, and one-off native work (a load) runs
on :func:`run_on_own_thread`, whose thread ends with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

log = logging.getLogger("skulk.threads")

_STOP = object()


def _nothing() -> None:
    pass


class EngineThread:
    """Runs blocking calls one after another, in the order they were submitted, on one thread.

    A caller that is cancelled while its call runs waits for the call to finish (the call mutates
    engine state that the next call needs consistent), as ``anyio.to_thread.run_sync`` does by
    default. The thread starts on the first call and ends on :meth:`close`. A ``shared`` thread
    (:func:`compute_thread`) serves several engines: its :meth:`run_last` runs the call and leaves
    the thread to the others.
    """

    def __init__(self, name: str, *, shared: bool = False) -> None:
        self.name = name
        self.shared = shared
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RuntimeError(f"{self.name} is closed")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): anyio's own hand-off
            return await anyio.to_thread.run_sync(func, *args)
        future: asyncio.Future[T] = loop.create_future()
        self._put((func, args, loop, future))  # before any await: the call starts now
        try:
            return await future
        except asyncio.CancelledError:
            # The call may still be running: wait until the thread has passed it (a call queued
            # behind it has run), then let the cancellation go on. Only here, not around every
            # call: an anyio cancel scope costs 15-20 us a step on the event loop in a node.
            with anyio.CancelScope(shield=True):
                try:
                    await self.run(_nothing)
                except RuntimeError:  # closed meanwhile: the thread ends after the calls queued
                    await anyio.to_thread.run_sync(self.join)
            raise

    def call(self, func: Callable[..., T], *args: Any) -> T:
        """From a thread that is not an event loop's: run ``func(*args)`` here, after the calls
        already queued, and block until it returns (its exception is raised to the caller)."""
        if threading.current_thread() is self._thread:
            return func(*args)  # already on it: queueing would wait for ourselves
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._put((func, args, None, future))
        return future.result()

    def submit(self, func: Callable[..., object], *args: Any) -> None:
        """From any thread: run ``func(*args)`` on this thread after the calls already queued, and
        return at once. Nobody waits for it, so ``func`` handles its own errors (one that escapes is
        logged, and the thread goes on). Raises RuntimeError once the thread is closed."""
        self._put((func, args, None, None))

    def _put(self, item: tuple[Any, ...]) -> None:
        # Locked: the event loop and a stage link's thread may both be first, or one may close the
        # thread while the other queues a call, which must then fail, not wait behind the stop.
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
            self._queue.put(item)

    @property
    def closed(self) -> bool:
        return self._closed

    async def run_last(self, func: Callable[[], object]) -> None:
        """Run ``func`` after the calls already queued, as the last call, then close; nothing if
        closed already (an engine's ``close``, safe to call twice). Shielded: it always finishes.
        On a shared thread, ``func`` runs and the thread stays open for the engines that share it."""
        if self._closed:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.run(func)
            finally:
                if not self.shared:
                    self.close()

    def close(self) -> None:
        """Let the thread end once the calls already queued have run (never blocks)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        """After :meth:`close`: wait until the thread has ended (blocking; immediate when the queue
        is empty, as the thread then only has to take the stop marker)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            func, args, loop, future = item
            try:
                result = func(*args)
            except BaseException as exc:
                if future is None:  # submitted: nobody to raise it to
                    log.exception("%s: a submitted call failed", self.name)
                else:  # handed to the caller, raised there
                    _deliver(loop, future, None, exc)
            else:
                if future is not None:
                    _deliver(loop, future, result, None)


def _deliver(loop: asyncio.AbstractEventLoop | None, future: Any, result: Any, exc: BaseException | None) -> None:
    if loop is None:  # from call(): a concurrent future, whose waiter blocks on it
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return

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


_compute: EngineThread | None = None
_compute_lock = threading.Lock()


def compute_thread() -> EngineThread:
    """The process's thread for CPU-bound engine work: every engine computing on the CPU queues its
    steps here, so one OpenMP team serves them all (see the module's docstring). Calls run in the
    order they were queued, whichever engine queued them. It is ``shared``: an engine's
    :meth:`EngineThread.run_last` (its ``close``) leaves it running for the others."""
    global _compute
    with _compute_lock:
        if _compute is None or _compute.closed:
            _compute = EngineThread("skulk compute", shared=True)
        return _compute


async def run_on_own_thread(name: str, func: Callable[..., T], *args: Any) -> T:
    """Run a blocking call on a new thread that has ended when this returns, so per-thread native
    state the call set up (an OpenMP team) does not outlive it. Cancelling the caller waits for the call."""
    thread = EngineThread(name)
    try:
        return await thread.run(func, *args)
    finally:
        thread.close()
        thread.join(5.0)  # the call is done: the thread only has to take the stop marker

