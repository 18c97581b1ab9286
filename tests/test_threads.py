"""EngineThread: calls run in order on one thread, start before the caller yields, and a cancelled
caller still waits for the call it started. compute_thread is one per process; run_on_own_thread's
thread ends with its call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest

from skulk_core import EngineThread, compute_thread, run_on_own_thread

@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_calls_run_in_order_on_one_named_thread():
    worker = EngineThread("engine test")
    seen: list[tuple[int, str]] = []

    def call(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    async with anyio.create_task_group() as tg:
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await worker.run(call, i)

        for i in range(20):
            tg.start_soon(one, i)
    assert results == {i: i * i for i in range(20)}
    assert {name for _, name in seen} == {"engine test"}
    worker.close()


@pytest.mark.anyio
async def test_the_call_starts_before_the_caller_yields():
    """The hand-off that makes a step overlap the event loop's work: by the time any other task
    runs, the call is already running on the thread."""
    worker = EngineThread("engine test")
    started = threading.Event()
    release = threading.Event()

    def call() -> str:
        started.set()
        release.wait(5)
        return "done"

    observed: list[bool] = []

    async def other_task() -> None:
        # Runs at the caller's first yield and blocks the event loop: the call can only start if
        # it was handed to the thread before that yield (anyio.to_thread.run_sync yields first).
        observed.append(started.wait(2))
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other_task)
        assert await worker.run(call) == "done"
    assert observed == [True]
    worker.close()


@pytest.mark.anyio
async def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    worker = EngineThread("engine test")

    def fail() -> None:
        raise ValueError("bad step")

    with pytest.raises(ValueError, match="bad step"):
        await worker.run(fail)
    assert await worker.run(lambda: 42) == 42
    worker.close()


def _slow(finished: list[float]) -> Callable[[], None]:
    """A call that takes 0.3 s and notes when it ended."""

    def slow() -> None:
        time.sleep(0.3)
        finished.append(time.monotonic())

    return slow


@pytest.mark.anyio
async def test_a_cancelled_caller_waits_for_its_call_to_finish():
    worker = EngineThread("engine test")
    finished: list[float] = []
    with anyio.move_on_after(0.05):
        await worker.run(_slow(finished))
    # the cancel scope took effect only once the call was over: engine state is never half-changed
    assert finished and time.monotonic() >= finished[0]
    worker.close()


@pytest.mark.anyio
async def test_a_caller_cancelled_while_the_thread_closes_still_waits_for_its_call():
    worker = EngineThread("engine test")
    finished: list[float] = []

    async def close_soon() -> None:
        await anyio.sleep(0.02)
        worker.close()  # the cancelled caller can queue nothing more behind its call

    async with anyio.create_task_group() as tg:
        tg.start_soon(close_soon)
        with anyio.move_on_after(0.05) as scope:
            await worker.run(_slow(finished))
    assert scope.cancelled_caught
    assert finished and time.monotonic() >= finished[0]


@pytest.mark.anyio
async def test_close_lets_queued_calls_finish_and_refuses_new_ones():
    worker = EngineThread("engine test")
    assert await worker.run(lambda: 1) == 1
    worker.close()
    assert worker.closed
    with pytest.raises(RuntimeError, match="engine test is closed"):
        await worker.run(lambda: 2)
    worker.close()  # twice is fine


def test_falls_back_to_anyio_threads_off_asyncio():
    pytest.importorskip("trio")

    async def main() -> str:
        return await EngineThread("engine test").run(lambda: threading.current_thread().name)

    assert anyio.run(main, backend="trio") != "engine test"  # anyio's worker thread ran it


@pytest.mark.anyio
async def test_run_last_runs_after_the_queue_then_closes_and_is_a_no_op_after():
    worker = EngineThread("engine test")
    order: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run, lambda: order.append("step"))
        await anyio.sleep(0)
        await worker.run_last(lambda: order.append("close"))
    assert order == ["step", "close"] and worker.closed
    await worker.run_last(lambda: order.append("again"))  # closed already: nothing runs
    assert order == ["step", "close"]


@pytest.mark.anyio
async def test_cpu_engines_share_one_compute_thread():
    """Every caller gets the same thread, so one OpenMP team serves every CPU engine of a process."""
    first, second = compute_thread(), compute_thread()
    assert first is second and not first.closed
    idents = {await first.run(threading.get_ident), await second.run(threading.get_ident)}
    assert len(idents) == 1 and threading.get_ident() not in idents


@pytest.mark.anyio
async def test_run_on_own_thread_ends_its_thread_with_the_call():
    thread = await run_on_own_thread("one-off load", threading.current_thread)
    assert thread.name == "one-off load" and thread is not threading.current_thread()
    assert not thread.is_alive()  # ended already: nothing it set up (an OpenMP team) outlives the call
    with pytest.raises(ValueError, match="bad input"):
        await run_on_own_thread("one-off load", int, "bad input")


def test_call_runs_on_the_thread_from_another_thread_in_order_with_run():
    """call() is run() for a plain thread (a direct stage link's): the same queue, the same thread,
    the callee's exception raised to the caller; from the thread itself it runs inline."""
    worker = EngineThread("engine test")
    seen: list[str] = []

    def record(tag: str) -> str:
        seen.append(tag)
        return threading.current_thread().name

    def fail() -> None:
        raise ValueError("from the engine")

    async def from_the_loop() -> str:
        return await worker.run(record, "loop")

    assert anyio.run(from_the_loop) == "engine test"
    results: list[object] = []
    caller = threading.Thread(target=lambda: results.append(worker.call(record, "thread")))
    caller.start()
    caller.join(5)
    assert results == ["engine test"] and seen == ["loop", "thread"]
    with pytest.raises(ValueError, match="from the engine"):
        worker.call(fail)
    assert worker.call(lambda: worker.call(record, "nested")) == "engine test"  # inline, no deadlock
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.call(record, "late")
    worker.join(5)


def test_submit_returns_at_once_and_runs_in_order_and_a_failure_is_logged(caplog: pytest.LogCaptureFixture):
    """submit() is call() without the wait (a stage link's thread hands a step over and reads the
    next): queued in order with the other calls; nobody gets its exception, so it is logged and the
    thread goes on."""
    worker = EngineThread("engine test")
    gate = threading.Event()
    seen: list[tuple[str, str]] = []

    def record(tag: str) -> None:
        seen.append((tag, threading.current_thread().name))

    def fail() -> None:
        raise ValueError("from a submitted call")

    worker.submit(gate.wait, 5)
    worker.submit(record, "first")
    worker.submit(fail)
    worker.submit(record, "second")
    assert seen == []  # nothing waited: the thread is still held at the gate
    gate.set()
    assert worker.call(record, "called") is None
    assert seen == [("first", "engine test"), ("second", "engine test"), ("called", "engine test")]
    assert "engine test: a submitted call failed" in caplog.text and "from a submitted call" in caplog.text
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(record, "late")
