"""Serving benchmark: skulk against llama-cpp-python's own OpenAI server and the raw llama.cpp loop.

One run measures, on the same model (the default GGUF), the same prompt and the same thread count:

- skulk: a real ``skulk run`` process (llamacpp backend, openai frontend, standalone, loopback);
- the peer: ``python -m llama_cpp.server`` on the same GGUF, threads and per-request context;
- raw: a plain ``llama_decode`` loop in this process (greedy argmax), one sequence, and ``--clients``
  sequences decoded together in one ``llama_batch``.

Both servers are measured through their streaming ``/v1/chat/completions`` with identical request
bodies (temperature 0, a fixed prompt, a fixed ``max_tokens``, the model's end-of-generation tokens
banned with ``logit_bias`` so that both always generate exactly ``max_tokens`` tokens). The three
are measured in interleaved rounds (raw, skulk, peer; then the next round), so that the noise of a
shared machine falls on all of them alike.

    .venv/bin/python benchmarks/serving.py [--threads 2] [--max-tokens 128] [--clients 8] [--runs 5] [--json]

The peer needs the server extras of llama-cpp-python (not its reinstall); the script says how to
install them when they are missing. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from attrs import define, frozen

MODEL_ID = "smollm2-135m-instruct"
# 47 tokens with SmolLM2's template. The session number makes every request's prompt differ from
# the previous one's after a few tokens, so a server that keeps the last prompt's KV cache (the
# peer does) cannot skip the prefill; --same-prompt sends the identical prompt every time instead.
SYSTEM = "Session {number:04d}. You are a helpful assistant."
PROMPT = "Write a short story about a young fox who finds its way home through a busy city at night."
# llama_cpp.server's "server" extra, by import name -> distribution name. llama-cpp-python itself is
# already in the environment (built from source); installing the extra with pip would rebuild it.
PEER_EXTRAS = {
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "sse_starlette": "sse-starlette",
    "starlette_context": "'starlette-context>=0.3.6,<0.4'",
    "pydantic_settings": "pydantic-settings",
    "yaml": "PyYAML",
}
NEEDED = {
    "llama_cpp": "llama-cpp-python",
    "httpx": "httpx",
    "skulk_llamacpp": "./plugins/skulk-llamacpp",
    "skulk_openai": "./plugins/skulk-openai",
}
TARGETS = {  # the targets (issue 3, "Proof")
    "decode_vs_peer": 1.2,
    "decode_vs_raw": 0.9,
    "ttft_vs_peer": 1.1,
    "aggregate_vs_peer": 2.0,
    "worst_ttft_s": 2.0,
}


# -- measurements -------------------------------------------------------------------------------


@frozen
class StreamResult:
    """One streamed request as the client saw it (times in seconds from sending the request)."""

    ttft: float  # the first chunk that carries content
    end: float  # the chunk that carries finish_reason
    tokens: int  # completion tokens
    chunks: int  # content-bearing chunks
    finish_reason: str | None
    usage_tokens: int | None  # usage.completion_tokens, when the server sends it

    @property
    def decode_rate(self) -> float:
        """Tokens after the first over the time after the first."""
        return (self.tokens - 1) / (self.end - self.ttft) if self.end > self.ttft and self.tokens > 1 else float("nan")


@frozen
class ConcurrentResult:
    wall: float  # from sending every request to the last one finishing
    tokens: int
    worst_ttft: float
    streams: tuple[StreamResult, ...] = ()

    @property
    def aggregate_rate(self) -> float:
        return self.tokens / self.wall


@define
class Samples:
    """What one system produced over all rounds."""

    decode: list[float] = attrs.Factory(list)  # single-stream decode tokens/s
    ttft: list[float] = attrs.Factory(list)  # single-stream time to first token, s
    aggregate: list[float] = attrs.Factory(list)  # tokens/s with --clients at once
    worst_ttft: list[float] = attrs.Factory(list)  # the slowest first token among those clients, s
    noisy: dict[str, list[bool]] = attrs.Factory(dict)  # per metric: which samples other processes disturbed
    notes: list[str] = attrs.Factory(list)

    def add(self, metric: str, value: float, noisy: bool) -> None:
        getattr(self, metric).append(value)
        self.noisy.setdefault(metric, []).append(noisy)

    def median(self, metric: str) -> float | None:
        """The median of the undisturbed samples; of all of them when every one was disturbed."""
        values = getattr(self, metric)
        clean = [v for v, noisy in zip(values, self.noisy.get(metric, [])) if not noisy]
        return median(clean or values)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# -- the HTTP client ----------------------------------------------------------------------------


def messages(number: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM.format(number=number)}, {"role": "user", "content": PROMPT}]


class Prompts:
    """The chat request bodies, numbered one after another unless every request is to be the same."""

    def __init__(self, max_tokens: int, ban: Sequence[int], *, same: bool) -> None:
        self.max_tokens = max_tokens
        self.ban = ban
        self.same = same
        self.count = 0

    def next(self, max_tokens: int | None = None) -> dict[str, Any]:
        if not self.same:
            self.count += 1
        return chat_body(messages(self.count % 10000), max_tokens or self.max_tokens, self.ban)


def chat_body(chat: list[dict[str, str]], max_tokens: int, ban: Sequence[int]) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Ban end-of-generation so both servers generate exactly max_tokens tokens (skulk's own
        # "ignore_eos" would do it too, but the peer has no such field: one body for both).
        "logit_bias": {str(t): -100 for t in ban},
    }


@define
class _StreamState:
    first: float | None = None
    end: float | None = None
    chunks: int = 0
    finish: str | None = None
    usage: int | None = None

    def note(self, event: dict[str, Any], now: float, url: str) -> None:
        if "error" in event:
            raise RuntimeError(f"{url} sent an error event: {event['error']}")
        if event.get("usage"):
            self.usage = event["usage"].get("completion_tokens")
        for choice in event.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                self.chunks += 1
                if self.first is None:
                    self.first = now
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self.end = now


class _Events:
    """Server-sent events split from a streamed body, fed to a stream's state as they arrive."""

    def __init__(self, state: _StreamState, url: str) -> None:
        self.state = state
        self.url = url
        self.buffer = b""

    def feed(self, data: bytes, now: float) -> None:
        self.buffer += data.replace(b"\r\n", b"\n")
        *events, self.buffer = self.buffer.split(b"\n\n")
        for raw in events:
            line = next((part for part in raw.split(b"\n") if part.startswith(b"data:")), None)
            if line is None or line[5:].strip() == b"[DONE]":
                continue  # ": ping" comments, the end marker
            self.state.note(json.loads(line[5:]), now, self.url)


class _Chunked:
    """Incremental decoding of an HTTP/1.1 chunked body."""

    def __init__(self) -> None:
        self.buffer = b""
        self.left = 0  # bytes of the current chunk still to come
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buffer += data
        out: list[bytes] = []
        while not self.done:
            if self.left:
                piece = self.buffer[: self.left]
                out.append(piece)
                self.left -= len(piece)
                self.buffer = self.buffer[len(piece) :]
                if self.left:
                    break
                continue
            # The CRLF ending the previous chunk, if any, then the next chunk's size line.
            if self.buffer.startswith(b"\r\n"):
                self.buffer = self.buffer[2:]
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(self.buffer[:end].split(b";", 1)[0], 16)
            self.buffer = self.buffer[end + 2 :]
            if size == 0:
                self.done = True
            self.left = size
        return b"".join(out)


def stream_chats(url: str, bodies: Sequence[dict[str, Any]], client: str = "lean") -> list[StreamResult]:
    """Send streaming chat requests at once and time each one's server-sent events.

    The lean client (the default) speaks HTTP/1.1 over plain sockets and one ``select`` loop: about
    0.1 ms of CPU per streamed token, against about 0.5 ms for httpx's (``client="httpx"``). The
    client runs on the servers' CPUs and raw pays for none, so a heavy one is charged to the servers."""
    start = time.perf_counter()
    if client == "httpx":
        streams = asyncio.run(_httpx_streams(url, bodies, start))
    else:
        streams = _lean_streams(url, bodies, start)
    results = []
    for body, events in zip(bodies, streams):
        state = events.state
        if state.first is None or state.end is None:
            raise RuntimeError(f"{url} streamed no content (finish_reason {state.finish!r})")
        # The same rule for both servers: "length" means exactly max_tokens were generated.
        tokens = body["max_tokens"] if state.finish == "length" else state.chunks
        results.append(StreamResult(state.first, state.end, tokens, state.chunks, state.finish, state.usage))
    return results


async def _httpx_streams(url: str, bodies: Sequence[dict[str, Any]], start: float) -> list[_Events]:
    import httpx

    async def one(session: Any, body: dict[str, Any]) -> _Events:
        events = _Events(_StreamState(), url)
        async with session.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"{url} answered {response.status_code}: {text[:500]}")
            async for data in response.aiter_raw():
                events.feed(data, time.perf_counter() - start)
        return events

    limits = httpx.Limits(max_connections=len(bodies) + 1, max_keepalive_connections=len(bodies) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=10.0), limits=limits) as session:
        return list(await asyncio.gather(*(one(session, body) for body in bodies)))


@define(eq=False)
class _LeanStream:
    sock: socket.socket
    events: _Events
    head: bytes = b""
    decoder: _Chunked | None = None
    status: int | None = None
    error: bytes = b""  # the body of an answer other than 200

    def feed(self, data: bytes, now: float) -> bool:
        """Take what the socket gave; whether the response is complete."""
        if self.status is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return False
            status_line, *lines = self.head[:end].decode("latin-1").split("\r\n")
            self.status = int(status_line.split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self.decoder = _Chunked()
            data, self.head = self.head[end + 4 :], b""
        body = self.decoder.feed(data) if self.decoder is not None else data
        if self.status != 200:
            self.error += body
        else:
            self.events.feed(body, now)
        return self.decoder is not None and self.decoder.done


def _lean_streams(url: str, bodies: Sequence[dict[str, Any]], start: float, timeout: float = 900.0) -> list[_Events]:
    address = urllib.parse.urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    streams: list[_LeanStream] = []
    with selectors.DefaultSelector() as selector:
        try:
            for body in bodies:
                payload = json.dumps(body).encode()
                sock = socket.create_connection((host, port), timeout=10.0)
                streams.append(_LeanStream(sock, _Events(_StreamState(), url)))
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                    b"Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (host.encode(), port, len(payload), payload)
                )
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, streams[-1])
            deadline = time.monotonic() + timeout
            open_streams = len(streams)
            while open_streams:
                ready = selector.select(max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"{url}: no answer within {timeout:.0f} s")
                for key, _ in ready:
                    stream: _LeanStream = key.data
                    data = stream.sock.recv(65536)
                    now = time.perf_counter() - start
                    if not data or stream.feed(data, now):
                        selector.unregister(stream.sock)
                        open_streams -= 1
                        if stream.status != 200:
                            text = stream.error.decode(errors="replace")
                            raise RuntimeError(f"{url} answered {stream.status}: {text[:500]}")
        finally:
            for stream in streams:
                stream.sock.close()
    return [stream.events for stream in streams]


def single_stream(url: str, body: dict[str, Any], client: str = "lean") -> StreamResult:  # one client, one request
    return stream_chats(url, [body], client)[0]


def concurrent_streams(url: str, bodies: Sequence[dict[str, Any]], client: str = "lean") -> ConcurrentResult:
    start = time.perf_counter()
    results = stream_chats(url, bodies, client)
    wall = time.perf_counter() - start
    return ConcurrentResult(wall, sum(r.tokens for r in results), max(r.ttft for r in results), tuple(results))


# -- the servers --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In a server's process, before it execs: have Linux send it SIGTERM when the benchmark dies,
    even by SIGKILL, so that no server outlives a killed run (prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the try/finally in run() still stops both servers


def find_free_port() -> int:
    from skulk_core.testing import find_free_port as free

    return free("127.0.0.1")


def http_get(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], str | None]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        problem = alive()
        if problem:
            raise RuntimeError(f"{what}: {problem}")
        try:
            if check():
                return
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


class SkulkServer:
    """``skulk run`` with only the llama.cpp backend and the OpenAI frontend, standalone on loopback."""

    name = "skulk"

    def __init__(
        self, workdir: Path, threads: int, context: int, sequences: int, name: str = "skulk", extra_env: dict[str, str] | None = None
    ) -> None:
        from skulk_core.testing import SkulkProcess

        self.name = name
        data_dir = workdir / name
        data_dir.mkdir()
        config = data_dir / "skulk.yaml"
        config.write_text("")  # no ./skulk.yaml of the caller's may change what is measured
        args = [
            "--no-autoload", "--plugin", "llamacpp", "--plugin", "openai", "--no-discovery",
            "--transport-host", "127.0.0.1", "--transport-port", str(find_free_port()),
            "--log-level", "info",
        ]  # fmt: skip  (no --model: the default model, served under its id MODEL_ID)
        self.process = SkulkProcess(data_dir, args=args)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKULK_")}
        env.update(
            SKULK_CONFIG=str(config),
            SKULK_SERVE_THREADS=str(threads),
            SKULK_SERVE_CONTEXT_LENGTH=str(context),
            SKULK_SERVE_MAX_SEQUENCES=str(sequences),
            **(extra_env or {}),
        )
        self.process.env = env
        self.url = self.process.url
        self.log_path = self.process.log_path

    def start(self) -> None:
        # SkulkProcess.start's command, with the child tied to this process's life.
        process = self.process
        process.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "skulk_core", "run", "--data-dir", str(process.data_dir),
            "--api-host", "127.0.0.1", "--api-port", str(process.api_port), *process.args,
        ]  # fmt: skip
        with process.log_path.open("ab") as log:
            process.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=process.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            models = http_get(self.url + "/v1/models")["data"]
            return any(m["id"] == MODEL_ID and m.get("status") == "ready" for m in models)

        wait_until(ready, timeout, "skulk", self._dead)

    def _dead(self) -> str | None:
        proc = self.process.process
        if proc is not None and proc.poll() is not None:
            return f"exited with {proc.returncode}; log {self.log_path}:\n{self.process.log_text()[-2000:]}"
        return None

    def pid(self) -> int | None:
        return self.process.process.pid if self.process.process else None

    def stop(self) -> None:
        self.process.stop(timeout=10)


class PeerServer:
    """llama-cpp-python's own OpenAI server on the same GGUF, threads and per-request context."""

    name = "peer"

    def __init__(self, workdir: Path, model: Path, threads: int, context: int, flash_attn: bool = False, extra: Sequence[str] = ()) -> None:
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "peer.log"
        self.command = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(model), "--model_alias", MODEL_ID,
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(context),
            "--host", "127.0.0.1", "--port", str(self.port),
            # By default a new request cuts off the stream in progress; every client must get its
            # whole answer for the numbers to mean anything.
            "--interrupt_requests", "False",
            # Its own default is off; --peer-flash-attn gives it the kernels skulk uses by default.
            "--flash_attn", str(flash_attn),
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
            )

    def wait_ready(self, timeout: float) -> None:
        wait_until(lambda: bool(http_get(self.url + "/v1/models")["data"]), timeout, "llama_cpp.server", self._dead)

    def _dead(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            return f"exited with {self.process.returncode}; log {self.log_path}:\n{tail}"
        return None

    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# -- the raw engine -----------------------------------------------------------------------------


class RawEngine:
    """A plain llama.cpp decode loop on the same model: no server, no sampler, argmax in numpy.

    The context is built like skulk's llama.cpp engine builds its own (``sequences`` KV streams of
    ``context`` positions, ``kv_unified`` off, ``n_batch`` 512, and the flash-attention and KV-cache
    settings of ``LlamaCppSettings()``, the engine's defaults), so the loop is the most that engine
    could get out of llama.cpp with these threads.
    """

    def __init__(self, model: Path, threads: int, context: int, sequences: int) -> None:
        import llama_cpp
        import numpy as np

        self.llama_cpp, self.np = llama_cpp, np
        from skulk_llamacpp.engine import _GGML_TYPES
        from skulk_llamacpp.native import LoadedModel
        from skulk_llamacpp.settings import LlamaCppSettings

        engine = LlamaCppSettings()  # what skulk's engine runs with unless configured otherwise
        self.loaded = LoadedModel(model, engine)  # loaded as the engine loads it (its logs go to logging)
        self.model, self.vocab, self.n_vocab = self.loaded.ptr, self.loaded.vocab, self.loaded.n_vocab
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context * sequences
        params.n_seq_max = sequences
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if engine.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = params.type_v = _GGML_TYPES[engine.kv_cache_type]
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.sequences = sequences

    def end_of_generation_tokens(self) -> list[int]:
        return [t for t in range(self.n_vocab) if self.llama_cpp.llama_vocab_is_eog(self.vocab, t)]

    def prompt_tokens(self, model: Path) -> list[int]:
        """The chat prompt rendered with the model's own template, tokenized as skulk does."""
        from skulk_core.chat import render_chat
        from skulk_core.gguf_meta import read_gguf_metadata

        template = read_gguf_metadata(model).get("tokenizer.chat_template")
        text = render_chat(template, messages(0)).encode()
        out = (self.llama_cpp.llama_token * (len(text) + 8))()
        n = self.llama_cpp.llama_tokenize(self.vocab, text, len(text), out, len(out), False, True)
        if n < 0:
            raise RuntimeError("tokenizing the prompt failed")
        return list(out[:n])

    def _decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence id, wants logits); at most the batch's 512."""
        b = self.batch
        for i, (token, position, seq, wants) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, position, 1, wants
            b.seq_id[i][0] = seq
        b.n_tokens = len(rows)
        status = self.llama_cpp.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _prefill(self, prompt: Sequence[int], sequences: int, ban: Sequence[int]) -> list[int]:
        """Every sequence's prompt, packed into as few llama_decode calls as 512-token batches allow;
        returns each sequence's first token."""
        rows = [(t, i, s, i == len(prompt) - 1) for s in range(sequences) for i, t in enumerate(prompt)]
        first = [0] * sequences
        for start in range(0, len(rows), 512):
            part = rows[start : start + 512]
            self._decode(part)
            for index, (_, _, seq, wants) in enumerate(part):
                if wants:
                    first[seq] = self._argmax(index, ban)
        return first

    def _argmax(self, row: int, ban: Sequence[int]) -> int:
        logits = self.np.ctypeslib.as_array(self.llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        logits[list(ban)] = -self.np.inf  # what the servers' logit_bias does
        return int(self.np.argmax(logits))

    def single(self, prompt: Sequence[int], max_tokens: int, ban: Sequence[int]) -> float:
        """Decode tokens/s of one sequence (tokens after the first over the time after the first)."""
        self.llama_cpp.llama_memory_clear(self.memory, True)
        token = self._prefill(prompt, 1, ban)[0]
        start = time.perf_counter()
        for position in range(len(prompt), len(prompt) + max_tokens - 1):
            self._decode([(token, position, 0, True)])
            token = self._argmax(0, ban)
        return (max_tokens - 1) / (time.perf_counter() - start)

    def batched(self, prompt: Sequence[int], max_tokens: int, ban: Sequence[int], clients: int) -> ConcurrentResult:
        """``clients`` sequences: their prompts in one llama_decode, then one token each per llama_decode."""
        self.llama_cpp.llama_memory_clear(self.memory, True)
        n = len(prompt)
        start = time.perf_counter()
        tokens = self._prefill(prompt, clients, ban)
        first = time.perf_counter() - start
        for position in range(n, n + max_tokens - 1):
            self._decode([(tokens[s], position, s, True) for s in range(clients)])
            tokens = [self._argmax(s, ban) for s in range(clients)]
        wall = time.perf_counter() - start
        return ConcurrentResult(wall, clients * max_tokens, first)

    def close(self) -> None:
        self.llama_cpp.llama_batch_free(self.batch)
        self.llama_cpp.llama_free(self.ctx)
        self.loaded.free()


# -- the run ------------------------------------------------------------------------------------


def check_environment() -> None:
    missing = [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"serving.py needs {', '.join(missing)} in this environment (see benchmarks/README.md)")
    extras = [dist for module, dist in PEER_EXTRAS.items() if importlib.util.find_spec(module) is None]
    if extras:
        sys.exit(
            "The peer, llama-cpp-python's OpenAI server, needs its 'server' extras, which are not installed:\n"
            f"    {sys.executable} -m pip install {' '.join(extras)}\n"
            "(install exactly these; `pip install 'llama-cpp-python[server]'` would rebuild llama.cpp)"
        )


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), to show what serving cost."""
    if pid is None:
        return None
    try:
        return _process_ticks(pid) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def thread_seconds(pid: int | None) -> tuple[float, float] | None:
    """(the main thread's, all other threads') CPU seconds so far, from /proc (Linux)."""
    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    main = rest = 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                used = _stat_ticks(Path(f"/proc/{pid}/task/{tid}/stat")) / tick
            except OSError:
                continue  # the thread ended meanwhile
            if int(tid) == pid:
                main += used
            else:
                rest += used
    except (OSError, IndexError, ValueError):
        return None
    return main, rest


class StreamCpu:
    """CPU that skulk's single streams cost, per generated token: the server's event loop (its main
    thread: HTTP, the scheduler, sampling), its engine threads (llama.cpp's), and this process's
    main thread, the benchmark's client. On a machine whose cores llama.cpp's threads already fill,
    the loop's and the client's time is taken from them: it is the part of the decode gap to the
    raw loop that no scheduler in the server can hide."""

    def __init__(self) -> None:
        self.loop = self.engine = self.client = 0.0
        self.tokens = 0

    def measure(self, pid: int | None, run: Callable[[], StreamResult]) -> StreamResult:
        server0, client0 = thread_seconds(pid), thread_seconds(os.getpid())
        result = run()
        server1, client1 = thread_seconds(pid), thread_seconds(os.getpid())
        if server0 and server1 and client0 and client1:
            self.loop += server1[0] - server0[0]
            self.engine += server1[1] - server0[1]
            self.client += client1[0] - client0[0]
            self.tokens += result.tokens
        return result

    def per_token_us(self) -> dict[str, int] | None:
        if not self.tokens:
            return None
        used = {"loop": self.loop, "engine": self.engine, "client": self.client}
        return {name: round(seconds / self.tokens * 1e6) for name, seconds in used.items()}


def progress(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, busy ticks) since boot, summed over CPUs (Linux /proc/stat); steal counts as busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values), sum(values) - values[3] - values[4]  # idle and iowait are not busy


def _process_ticks(pid: int) -> int:
    return _stat_ticks(Path(f"/proc/{pid}/stat"))  # every thread's, in the same ticks


def _stat_ticks(stat: Path) -> int:
    """utime + stime from a /proc stat file (of a process or of one of its threads)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def cpu_busy(window: float = 0.5) -> float | None:
    """The fraction of the machine's CPU time that was busy over ``window`` seconds."""
    try:
        total0, busy0 = _machine_ticks()
        time.sleep(window)
        total1, busy1 = _machine_ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


class ForeignLoad:
    """How much of the machine other processes used while one measurement ran.

    The machine's busy time minus what this benchmark's own processes (itself and both servers)
    used, as a fraction of all CPU time in the interval. On a shared machine another session's
    test run can start at any moment; llama.cpp's threads wait for each other at every step, so
    even a small share taken by others slows them down many times over.
    """

    def __init__(self, pids: Sequence[int | None]) -> None:
        self.pids = [pid for pid in pids if pid]
        self._start: tuple[int, int, int] | None = None
        self.end: tuple[int, int, int] | None = None

    def _sample(self) -> tuple[int, int, int] | None:
        try:
            total, busy = _machine_ticks()
            ours = sum(_process_ticks(pid) for pid in self.pids)
        except (OSError, ValueError, IndexError):
            return None
        return total, busy, ours

    def __enter__(self) -> ForeignLoad:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = self._sample()

    @property
    def fraction(self) -> float | None:
        if self._start is None or self.end is None:
            return None
        total, busy, ours = (b - a for a, b in zip(self._start, self.end))
        return max(0.0, busy - ours) / max(1, total)


class Measurer:
    """Runs each measurement on a quiet machine when it can, and again when others interfered.

    Before a measurement it waits (up to ``patience`` seconds) for the machine to be under 25 %
    busy; afterwards, if other processes took more than ``threshold`` of the machine meanwhile, it
    measures again (up to ``retries`` times). Past ``budget`` seconds it neither waits nor repeats,
    so a run on a busy machine still ends. The last attempt is kept either way, and counted as
    noisy if it was.
    """

    def __init__(
        self, pids: Sequence[int | None], *, patience: float, retries: int, threshold: float, budget: float
    ) -> None:
        self.pids = pids
        self.patience = patience
        self.retries = retries
        self.threshold = threshold
        self.deadline = time.monotonic() + budget
        self.waited = 0.0
        self.repeated = 0
        self.noisy = 0
        self.foreign: list[float] = []
        self.last_noisy = False

    def _wait_for_quiet(self) -> None:
        if self.patience <= 0 or time.monotonic() > self.deadline:
            return
        began = time.monotonic()
        while time.monotonic() - began < self.patience:
            busy = cpu_busy()
            if busy is None or busy <= 0.25:
                break
        self.waited += time.monotonic() - began

    def __call__(self, measure: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            self._wait_for_quiet()
            with ForeignLoad(self.pids) as load:
                result = measure()
            foreign = load.fraction
            self.last_noisy = foreign is not None and foreign > self.threshold
            if not self.last_noisy:
                self.foreign.append(foreign or 0.0)
                return result
            if attempt >= self.retries or time.monotonic() > self.deadline:
                self.noisy += 1
                self.foreign.append(foreign)
                return result
            attempt += 1
            self.repeated += 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    from skulk_core import default_model_path

    model = default_model_path()
    sequences = max(8, args.clients)
    quiet = args.json
    workdir = Path(tempfile.mkdtemp(prefix="skulk-bench-"))
    began = time.monotonic()
    load_before = load_average()
    samples = {name: Samples() for name in ("skulk", "peer", "raw")}
    info: dict[str, Any] = {}
    skulk = SkulkServer(workdir, args.threads, args.context, sequences)
    peer = PeerServer(workdir, model, args.threads, args.context, args.peer_flash_attn)
    servers = [skulk, peer]
    raw: RawEngine | None = None
    measurer: Measurer | None = None
    finished = False
    try:
        progress(quiet, f"starting skulk ({skulk.url}) and llama_cpp.server ({peer.url}); logs in {workdir}")
        for server in servers:
            server.start()
        raw = RawEngine(model, args.threads, args.context, sequences)
        ban = raw.end_of_generation_tokens()
        prompt = raw.prompt_tokens(model)
        prompts = Prompts(args.max_tokens, ban, same=args.same_prompt)
        for server in servers:
            server.wait_ready(timeout=120)
        progress(quiet, "warming up")
        for server in servers:
            for max_tokens in (8, args.max_tokens):
                warm = single_stream(server.url, prompts.next(max_tokens), args.client)
            info[f"{server.name}_usage_tokens"] = warm.usage_tokens
            info[f"{server.name}_chunks"] = warm.chunks
            info[f"{server.name}_finish_reason"] = warm.finish_reason
            info[f"{server.name}_prompt_tokens"] = _prompt_tokens(server.url, prompts.next(1))
        raw.single(prompt, 16, ban)
        info["raw_prompt_tokens"] = len(prompt)
        cpu_before = {server.name: cpu_seconds(server.pid()) for server in servers}
        measurer = Measurer(
            [os.getpid(), *(server.pid() for server in servers)],
            patience=args.quiet_wait,
            retries=args.retries,
            threshold=args.foreign_threshold,
            budget=args.budget - (time.monotonic() - began),
        )

        stream_cpu = StreamCpu()
        for round_index in range(args.runs):
            progress(quiet, f"single stream, round {round_index + 1}/{args.runs}")
            rate = measurer(lambda: raw.single(prompt, args.max_tokens, ban))
            samples["raw"].add("decode", rate, measurer.last_noisy)
            for server in _rotated(servers, round_index):
                stream = functools.partial(_one_stream, server.url, prompts, args.client)
                if server is skulk:  # and where its CPU went
                    result = measurer(lambda: stream_cpu.measure(skulk.pid(), stream))
                else:
                    result = measurer(stream)
                _check_complete(result, args.max_tokens, samples[server.name])
                samples[server.name].add("decode", result.decode_rate, measurer.last_noisy)
                samples[server.name].add("ttft", result.ttft, measurer.last_noisy)
                for _ in range(args.ttft_probes):  # short requests: more first-token samples
                    probe = measurer(lambda: single_stream(server.url, prompts.next(2), args.client))
                    samples[server.name].add("ttft", probe.ttft, measurer.last_noisy)

        for round_index in range(args.concurrent_runs):
            progress(quiet, f"{args.clients} concurrent clients, round {round_index + 1}/{args.concurrent_runs}")
            batched = measurer(lambda: raw.batched(prompt, args.max_tokens, ban, args.clients))
            samples["raw"].add("aggregate", batched.aggregate_rate, measurer.last_noisy)
            samples["raw"].add("worst_ttft", batched.worst_ttft, measurer.last_noisy)
            for server in _rotated(servers, round_index):
                result = measurer(
                    lambda: concurrent_streams(server.url, [prompts.next() for _ in range(args.clients)], args.client)
                )
                for stream in result.streams:
                    _check_complete(stream, args.max_tokens, samples[server.name])
                samples[server.name].add("aggregate", result.aggregate_rate, measurer.last_noisy)
                samples[server.name].add("worst_ttft", result.worst_ttft, measurer.last_noisy)
        info["skulk_stream_cpu_us_per_token"] = stream_cpu.per_token_us()
        for server in servers:
            before, after = cpu_before[server.name], cpu_seconds(server.pid())
            used = round(after - before, 2) if before is not None and after is not None else None
            info[f"{server.name}_cpu_s"] = used
        finished = True
    except Exception:
        print(f"the benchmark failed; both servers' logs are in {workdir}", file=sys.stderr)
        raise
    finally:
        for server in servers:
            server.stop()
        if raw is not None:
            raw.close()
        if not args.keep_logs and (finished or not _failed()):
            shutil.rmtree(workdir, ignore_errors=True)
    report = _report(args, samples, info)
    report["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "seconds": round(time.monotonic() - began, 1),
        "waited_for_quiet_s": round(measurer.waited, 1) if measurer else None,
        "measurements_repeated": measurer.repeated if measurer else None,
        "measurements_noisy": measurer.noisy if measurer else None,
        "foreign_load_max": round(max(measurer.foreign, default=0.0), 3) if measurer else None,
        "logs": str(workdir) if args.keep_logs else None,
    }
    return report


def _one_stream(url: str, prompts: Prompts, client: str) -> StreamResult:
    return single_stream(url, prompts.next(), client)


def _failed() -> bool:
    """Whether the exception unwinding now is an error (its logs are kept), not SIGTERM or Ctrl-C."""
    error = sys.exc_info()[1]
    return error is not None and not isinstance(error, (KeyboardInterrupt, SystemExit))


def _rotated(servers: list[Any], index: int) -> list[Any]:
    """Alternate which server goes first, so neither always runs right after the raw loop."""
    return servers[index % len(servers) :] + servers[: index % len(servers)]


def _check_complete(result: StreamResult, max_tokens: int, into: Samples) -> None:
    if result.finish_reason != "length":
        into.notes.append(f"a stream ended with finish_reason {result.finish_reason!r} after {result.chunks} chunks")
    if result.usage_tokens is not None and result.usage_tokens != max_tokens:
        into.notes.append(f"usage says {result.usage_tokens} completion tokens, expected {max_tokens}")


def _prompt_tokens(url: str, body: dict[str, Any]) -> int | None:
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps({**{k: v for k, v in body.items() if k != "stream_options"}, "stream": False, "max_tokens": 1})
        .encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["usage"]["prompt_tokens"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired(samples: dict[str, Samples], metric: str, name: str, against: str) -> dict[str, Any] | None:
    """``name`` / ``against`` round by round: each round measured both one after the other, so its
    own ratio is free of the drift between rounds (raw alone moved 147-182 tokens/s between runs
    here). The median and range over the rounds in which no other process disturbed either sample
    (over all rounds when there is no such round)."""
    a, b = samples[name], samples[against]
    pairs = list(zip(getattr(a, metric), getattr(b, metric), a.noisy.get(metric, []), b.noisy.get(metric, [])))
    clean = [x / y for x, y, noisy_x, noisy_y in pairs if y and not noisy_x and not noisy_y]
    ratios = clean or [x / y for x, y, _, _ in pairs if y]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def _report(args: argparse.Namespace, samples: dict[str, Samples], info: dict[str, Any]) -> dict[str, Any]:
    med = {name: {k: s.median(k) for k in ("decode", "ttft", "aggregate", "worst_ttft")} for name, s in samples.items()}
    skulk, peer, raw = med["skulk"], med["peer"], med["raw"]
    checks = [
        ("single-stream decode vs peer", _ratio(skulk["decode"], peer["decode"]), ">=", TARGETS["decode_vs_peer"]),
        ("single-stream decode vs raw", _ratio(skulk["decode"], raw["decode"]), ">=", TARGETS["decode_vs_raw"]),
        ("time to first token vs peer", _ratio(skulk["ttft"], peer["ttft"]), "<=", TARGETS["ttft_vs_peer"]),
        (
            f"aggregate, {args.clients} clients, vs peer",
            _ratio(skulk["aggregate"], peer["aggregate"]),
            ">=",
            TARGETS["aggregate_vs_peer"],
        ),
        (f"worst first token, {args.clients} clients (s)", skulk["worst_ttft"], "<", TARGETS["worst_ttft_s"]),
    ]
    targets = []
    for name, value, op, goal in checks:
        met = None
        if value is not None:
            met = value >= goal if op == ">=" else value <= goal if op == "<=" else value < goal
        targets.append({"name": name, "value": value, "target": f"{op} {goal}", "met": met})
    return {
        "settings": {
            "model": MODEL_ID,
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "clients": args.clients,
            "runs": args.runs,
            "concurrent_runs": args.concurrent_runs,
            "context_length": args.context,
            "same_prompt": args.same_prompt,
            "client": args.client,
            "flash_attn": {"skulk": _skulk_flash_attn(), "raw": _skulk_flash_attn(), "peer": args.peer_flash_attn},
            "prompt": messages(0),
        },
        "medians": med,
        "samples": {name: attrs.asdict(s) for name, s in samples.items()},
        "aggregate_vs_raw_batch": _ratio(skulk["aggregate"], raw["aggregate"]),
        # the two decode targets in one unit: 1.2x the peer asks for this fraction of raw
        "peer_decode_vs_raw": _ratio(peer["decode"], raw["decode"]),
        # decode and aggregate samples are one per round for each system, so they pair up by index
        "paired": {
            f"{metric}_vs_{against}": paired(samples, metric, "skulk", against)
            for metric in ("decode", "aggregate")
            for against in ("peer", "raw")
        },
        "info": info,
        "targets": targets,
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    med, samples = report["medians"], report["samples"]
    print(
        f"\nskulk vs llama_cpp.server vs raw llama_decode: {s['model']}, {s['threads']} threads, "
        f"{s['max_tokens']} tokens, {s['clients']} clients, context {s['context_length']}, {s['client']} client"
    )
    fa = s["flash_attn"]
    print("flash attention: " + ", ".join(f"{name} {'on' if on else 'off'}" for name, on in fa.items()) + (
        "" if fa["peer"] else " (the peer's own default; --peer-flash-attn turns it on there too)"
    ))
    rows = [
        ("single-stream decode, tokens/s", "decode", "{:.1f}"),
        ("time to first token, s", "ttft", "{:.3f}"),
        (f"aggregate, {s['clients']} clients, tokens/s", "aggregate", "{:.1f}"),
        (f"worst first token, {s['clients']} clients, s", "worst_ttft", "{:.2f}"),
    ]
    header = f"{'metric':<36} {'skulk':>28} {'peer':>28} {'raw':>28} {'skulk/peer':>11} {'skulk/raw':>10}"
    print(header)
    print("-" * len(header))
    for label, key, fmt in rows:
        cells = []
        for name in ("skulk", "peer", "raw"):
            values = samples[name][key]
            if not values:
                cells.append(f"{'-':>28}")
                continue
            clean = samples[name]["noisy"].get(key, []).count(False)
            spread = f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else ""
            cells.append(f"{fmt.format(med[name][key]) + spread + f' {clean}/{len(values)}':>28}")
        vs_peer = _ratio(med["skulk"][key], med["peer"][key])
        vs_raw = _ratio(med["skulk"][key], med["raw"][key])
        print(f"{label:<36} {' '.join(cells)} {_fmt_ratio(vs_peer):>11} {_fmt_ratio(vs_raw):>10}")
    print(
        "\neach cell: the median of the samples no other process disturbed (of all of them, if every one was),"
        "\nthe range of all samples, and how many of all were undisturbed."
    )
    print("raw: time to first token is the prefill of one prompt (single) or of all prompts in one batch (aggregate).")
    cells = []
    for key, label in (("decode", "single-stream decode"), ("aggregate", f"aggregate, {s['clients']} clients")):
        for against in ("peer", "raw"):
            pair = report["paired"][f"{key}_vs_{against}"]
            if pair is not None:
                cells.append(f"{label} skulk/{against} {pair['median']:.2f}x ({pair['min']:.2f}-{pair['max']:.2f}, {pair['rounds']} rounds)")
    if cells:
        print("paired by round (the median of each round's own ratio; the targets use the medians above):")
        for cell in cells:
            print(f"  {cell}")
    print("\ntargets (issue 3):")
    for target in report["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:.2f}"
        print(f"  {target['name']:<40} {value:>8}   target {target['target']:<8} {mark}")
    peer_vs_raw = report["peer_decode_vs_raw"]
    if peer_vs_raw is not None:
        needed = TARGETS["decode_vs_peer"] * peer_vs_raw
        print(
            f"  the peer decoded at {peer_vs_raw:.2f}x raw: {TARGETS['decode_vs_peer']}x the peer is {needed:.2f}x raw "
            f"in this run (skulk: {_fmt_ratio(_ratio(med['skulk']['decode'], med['raw']['decode']))})"
        )
    info = report["info"]
    print(
        f"\nprompt tokens: skulk {info.get('skulk_prompt_tokens')}, peer {info.get('peer_prompt_tokens')}, "
        f"raw {info.get('raw_prompt_tokens')}; "
        f"server CPU seconds while measured: skulk {info.get('skulk_cpu_s')}, peer {info.get('peer_cpu_s')}"
    )
    cpu = info.get("skulk_stream_cpu_us_per_token")
    if cpu:
        print(
            f"skulk's single streams, CPU a generated token: event loop {cpu['loop']} us, engine threads "
            f"{cpu['engine']} us; the benchmark's client {cpu['client']} us (whole requests, /proc ticks)"
        )
    m = report["machine"]
    print(
        f"load average before/after: {m['load_average_before']:.2f}/{m['load_average_after']:.2f} on {m['cpus']} CPUs; "
        f"{m['seconds']} s in all, {m['waited_for_quiet_s']} s of it waiting for a quiet machine"
    )
    print(
        f"measurements repeated because other processes took CPU meanwhile: {m['measurements_repeated']}; "
        f"kept although noisy: {m['measurements_noisy']} "
        f"(the most others took: {m['foreign_load_max']:.0%} of the machine)"
    )
    for name in ("skulk", "peer"):
        for note in sorted(set(samples[name]["notes"])):
            print(f"note ({name}): {note}")


def _skulk_flash_attn() -> bool:
    from skulk_llamacpp.settings import LlamaCppSettings

    return LlamaCppSettings().flash_attn


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# The options every benchmark against the peer takes (serving.py, scoring.py, turns.py).
SHARED_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--threads", dict(type=int, default=2, help="compute threads, the same for every server and raw (default 2)")),
    ("--context", dict(type=int, default=4096, help="positions per request, every server (default 4096)")),
    ("--json", dict(action="store_true", help="print one JSON document instead of the table")),
]


def parser_with(description: str, options: Sequence[tuple[str, dict[str, Any]]]) -> argparse.ArgumentParser:
    """An argument parser with :data:`SHARED_OPTIONS` and a benchmark's own ``options``."""
    parser = argparse.ArgumentParser(description=description)
    for flag, spec in [*SHARED_OPTIONS, *options]:
        parser.add_argument(flag, **spec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options: list[tuple[str, dict[str, Any]]] = [
        ("--max-tokens", dict(type=int, default=128, help="tokens generated per request (default 128)")),
        ("--clients", dict(type=int, default=8, help="concurrent clients for the aggregate (default 8)")),
        ("--runs", dict(type=int, default=5, help="single-stream rounds (default 5)")),
        ("--concurrent-runs", dict(type=int, default=3, help="rounds with --clients at once (default 3)")),
        ("--ttft-probes", dict(type=int, default=2, help="2-token requests per round, for first tokens (default 2)")),
        ("--same-prompt", dict(action="store_true", help="the same prompt every time (default: numbered)")),
        ("--peer-flash-attn", dict(action="store_true", help="run the peer with flash attention (default: its own default, off)")),
        ("--quiet-wait", dict(type=float, default=5.0, help="seconds to wait for an idle machine (default 5)")),
        ("--retries", dict(type=int, default=2, help="repeats of a measurement others interfered with (default 2)")),
        ("--foreign-threshold", dict(type=float, default=0.1, help="share of the CPU others may take (default 0.1)")),
        ("--budget", dict(type=float, default=200.0, help="seconds, then no more waits or repeats (default 200)")),
        ("--client", dict(choices=("lean", "httpx"), default="lean", help="the benchmark's HTTP client (default lean: HTTP/1.1 by hand)")),
        ("--keep-logs", dict(action="store_true", help="keep the servers' logs (their path is printed)")),
    ]
    parser = parser_with(__doc__.split("\n\n")[0], options)
    args = parser.parse_args(argv)
    if args.max_tokens < 2 or args.clients < 1 or args.runs < 1 or args.threads < 1:
        parser.error("--max-tokens must be at least 2; --clients, --runs and --threads at least 1")
    return run_and_report(args, run, print_table)


def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict[str, Any]], table: Callable[[dict[str, Any]], None]) -> int:
    """A benchmark's main after its options: check the environment, ``run``, print the report as
    JSON (``--json``) or as ``table`` prints it."""
    check_environment()
    # SIGTERM (a timeout, a CI runner) unwinds like Ctrl-C, so run()'s finally stops both servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = run(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
