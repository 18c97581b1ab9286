"""Pytest fixtures for Skulk and its plugin authors (registered through the ``pytest11`` entry point).

- ``free_port``: a TCP port free on loopback right now.
- ``skulk_plugins``: a fresh plugin set with autoload off (builtins only), for calling hooks.
- ``make_skulk_node``: start a real node in-process (own event loop in a thread) on loopback, with
  the plugins you name; every node it starts is stopped at teardown.
- ``skulk_node``: one such node with only the builtin plugins.
- ``skulk_process``: start real ``skulk run`` processes on loopback (:class:`SkulkProcess`); every
  one still running at teardown is stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from skulk_core.config import ConfigLoader
from skulk_core.node import Node, build_node
from skulk_core.plugins import PluginSelection, Plugins, make_plugin_manager


_HANDED_OUT: set[int] = set()  # ports this process returned, which their servers may not have bound yet


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host``, below the kernel's ephemeral port range.

    ``bind(0)`` picks from the ephemeral range, the same range the kernel takes outgoing
    connections' source ports from, so between this call and the server's own bind another
    connection can take the port (seen when five nodes dial each other as they start). Ports below
    the range are only ever taken by an explicit bind. Random, so two test processes rarely pick the
    same one, and never the same port twice in one process.
    """
    first, last = _listening_ports()
    chooser = random.SystemRandom()
    for _ in range(200):
        port = chooser.randrange(first, last)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded range: the kernel's pick
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening_ports() -> tuple[int, int]:
    """[first, last) of the ports worth choosing from: the third below the ephemeral range's start."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768 if sys.platform.startswith("linux") else 49152  # the usual defaults
    return max(1024, ephemeral // 3), max(1025, ephemeral)


def start_node_in_thread(
    stack: ExitStack,
    data_dir: Path,
    *,
    plugins: Sequence[str] = (),
    sections: dict[str, dict[str, Any]] | None = None,
    document: dict[str, Any] | None = None,
) -> Node:
    """Start a node on loopback in a worker thread's event loop; ``stack`` stops it.

    ``node.portal`` (an anyio blocking portal) runs coroutines in the node's loop:
    ``node.portal.call(some_async_function)``.
    """
    from anyio.from_thread import start_blocking_portal

    cli: dict[str, dict[str, Any]] = {
        "node": {"data_dir": str(data_dir)},
        "api": {"host": "127.0.0.1", "port": 0},
        "transport": {"host": "127.0.0.1", "port": 0},
        "serve": {"enabled": False},
        "cluster": {"discovery": False},
    }
    for name, values in (sections or {}).items():
        cli.setdefault(name, {}).update(values)
    loader = ConfigLoader(document=document or {}, env={}, cli=cli)
    node = build_node(loader, plugins=plugins, autoload=False)
    portal = stack.enter_context(start_blocking_portal())
    future, _ = portal.start_task(node.run, name=f"skulk node {node.node_id}")
    stack.callback(future.cancel)
    node.portal = portal  # type: ignore[attr-defined]  # run coroutines in the node's own loop
    return node


@pytest.fixture
def free_port() -> int:
    return find_free_port()


@pytest.fixture
def skulk_plugins() -> Plugins:
    return make_plugin_manager(PluginSelection(autoload=False))


@pytest.fixture
def make_skulk_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Node]]:
    with ExitStack() as stack:

        def make(plugins: Sequence[str] = (), sections: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> Node:
            data_dir = tmp_path_factory.mktemp("skulk-node")
            return start_node_in_thread(stack, data_dir, plugins=plugins, sections=sections, **kwargs)

        yield make


@pytest.fixture
def skulk_node(make_skulk_node: Callable[..., Node]) -> Node:
    return make_skulk_node()


class SkulkProcess:
    """A real ``skulk run`` process on loopback, its output in ``<data_dir>/process.log``."""

    def __init__(self, data_dir: Path, *, api_port: int | None = None, args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.api_port = api_port or find_free_port()
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log_path = self.data_dir / "process.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> SkulkProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "skulk_core", "run", "--data-dir", str(self.data_dir), "--api-host", "127.0.0.1", "--api-port", str(self.api_port), *self.args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> object:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.load(response)

    def wait_ready(self, timeout: float = 30.0, path: str = "/health") -> SkulkProcess:
        """Wait until ``path`` answers 200; raise with the log's tail if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"skulk exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            try:
                self.get(path, timeout=1.0)
                return self
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (urllib.error.URLError, OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{what} not met after {timeout} s:\n{self.log_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process and wait; SIGKILL if it is still running after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            return None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def skulk_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SkulkProcess]]:
    started: list[SkulkProcess] = []

    def spawn(args: Sequence[str] = (), *, env: dict[str, str] | None = None, data_dir: Path | None = None, api_port: int | None = None) -> SkulkProcess:
        proc = SkulkProcess(data_dir or tmp_path_factory.mktemp("skulk-proc"), api_port=api_port, args=args, env=env)
        started.append(proc)
        return proc.start()

    yield spawn
    for proc in started:
        proc.stop(timeout=10)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies use it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


SYNTHETIC_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_synthetic_gguf(
    path: Path,
    *,
    n_layers: int = 4,
    hidden: int = 128,
    ffn: int = 384,
    heads: int = 4,
    kv_heads: int = 2,
    context_length: int = 2048,
    dtype: str = "F16",
    seed: int = 0,
    name: str = "synthetic-llama",
) -> Path:
    """Write a llama-architecture GGUF with random weights and a byte-level vocabulary.

    The vocabulary is the 256 GPT-2 byte symbols, one merge and ChatML's special tokens, so every
    backend tokenizes it (about one token per byte) and renders chat without any download. Size it
    with the layer count and widths: the weights take about ``n_layers * (4 * hidden**2 +
    3 * hidden * ffn)`` values plus a ``(260, hidden)`` embedding.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    np_dtype = {"F16": np.float16, "F32": np.float32}[dtype]
    symbols = _bytes_to_unicode()
    # One merge (" t"), because llama.cpp refuses a BPE vocabulary without any.
    merged = symbols[ord(" ")] + symbols[ord("t")]
    tokens = [*SYNTHETIC_SPECIALS, *symbols.values(), merged]
    vocab = len(tokens)
    head_dim = hidden // heads

    def weight(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np_dtype)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_block_count(n_layers)
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "F16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SYNTHETIC_SPECIALS) + [gguf.TokenType.NORMAL] * 257)
    writer.add_token_merges([f"{symbols[ord(' ')]} {symbols[ord('t')]}"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    writer.add_tensor("token_embd.weight", weight(vocab, hidden, scale=1.0))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
