"""Pipeline benchmark: one model split over 1, 2 and 3 real node processes, and the torch stage alone.

One run measures, on the default model (smollm2-135m-instruct, Q4_1 GGUF, dequantized to fp32 by the
torch backend), with ratios taken only between numbers measured in this same run:

- latency: one stream, greedy (temperature 0, ``ignore_eos``), ``--tokens`` generated tokens,
  through the streaming chat endpoint of the node that owns stage 0 (so the data plane, which
  forwards tokens from the head to another node, is not in the number), with the instance placed
  over 1, 2 and 3 nodes of one local cluster. Per-token latency is the time from the first token's
  chunk to the last one's, over the tokens in between. Each placement is also measured through a
  node that is not the head, as an extra line.
- aggregate: 4 concurrent streams through the head, on 2 stages against 1 stage serving the same 4.
- torch: the torch stage alone (all 30 layers, ``engine.step`` with argmax, 2 threads) against
  transformers' own ``generate`` on the same GGUF, in one child process: load time and greedy
  decode tokens/s. transformers is not a dependency of any package here; when it is missing the
  script prints the command that installs it and skips this part.

Every node is a real ``skulk run`` (``--no-autoload --plugin tcp --plugin torch --plugin openai``,
``--no-discovery``, HTTP and transport on 127.0.0.1, ``SKULK_SERVE_ENABLED=false``) with each
stage limited to one thread (``SKULK_SERVE_THREADS=1``). Every process is stopped at the end, also
on an error or Ctrl-C.

To say where the time goes, the script also computes each placement's layer ranges alone, chained
in one process with one thread and no transport (the "breakdown"; for latency, once more with each
stage sleeping first as long as the others compute, as a pipeline's stage sits idle), and counts the CPU each node
process, and every other process on the machine, used during each measurement. For the aggregate it
also runs the 2-stage placement's stages at the same time, a process each, as they run when the
pipeline is full: on one machine the stages share its memory bandwidth, which a pipeline over
separate machines does not, and this line shows what that leaves as the best 2 stages can do here.

    .venv/bin/python benchmarks/pipeline.py [--only latency|aggregate|torch] [--tokens 64] [--runs 3] [--json]
        [--torch-device cpu|cuda|mps] [--torch-dtype float32|float16|bfloat16] [--quantize none|int8|int4]
        [--links direct|transport]

``--links transport`` turns the nodes' direct stage links off (``transport.direct_links: false``), so
steps travel stage to stage on the transport's connections, as with a TLS transport.
``--quantize int8`` (or ``int4``) runs the nodes' stages (and the breakdown's) with that ``torch.quantize``; the
torch part still compares float32 with transformers' float32.
``--torch-device``/``--torch-dtype`` move the torch part (both models) to a GPU or another element
type; the pipeline parts always run on what the nodes find (set ``CUDA_VISIBLE_DEVICES=`` to keep
their stages on the CPU of a GPU machine).

The machine's load average is printed at the start and the end of the run: on a shared 2-core
machine another busy process changes every number, so compare runs taken at a similar load (the
'others' column says how much CPU other processes took during the measurements behind each ratio).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import math
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from attrs import asdict, define, field, frozen

MODEL_ID = "smollm2-135m-instruct"
PROMPT = "Tell me a long story about a fox who finds its way home."
STREAMS = 4  # concurrent streams of the aggregate measurement
NODES = 3
CONTEXT = 512
# The version was checked against torch 2.13 and gguf 0.19 on this machine; transformers needs
# accelerate to load a GGUF file ("accelerate is required when loading a GGUF file").
TRANSFORMERS_INSTALL = ".venv/bin/pip install transformers==5.23.0 accelerate==1.15.0"

TARGET_LATENCY = 1.1  # n-stage / 1-stage per-token latency, at most
TARGET_AGGREGATE = 1.6  # 2-stage / 1-stage aggregate tokens/s, at least
TARGET_DECODE = 1.5  # skulk torch / transformers decode tokens/s, at least
TARGET_LOAD_S = 5.0  # skulk torch load, under


class BenchmarkError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _machine_ticks() -> tuple[int, int]:
    """(all CPU ticks, busy CPU ticks) of the machine so far, from /proc/stat (Linux)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values), sum(values) - idle


def _process_ticks(pid: int) -> int:
    """User + system CPU ticks of a process so far, all its threads (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


class CpuMeter:
    """CPU time over a ``with`` block, in cores: each named process, and the rest of the machine.

    ``others`` is what processes outside this benchmark used meanwhile (another session's tests on
    a shared machine): the number to look at before trusting a ratio.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "client": os.getpid()}
        self.cores: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = (time.perf_counter(), _machine_ticks(), {name: _process_ticks(pid) for name, pid in self.pids.items()})
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, (_, busy0), procs0 = self._start
        wall = time.perf_counter() - wall0
        _, busy1 = _machine_ticks()
        tick = os.sysconf("SC_CLK_TCK")
        cores = {name: (_process_ticks(pid) - procs0[name]) / tick / wall for name, pid in self.pids.items()}
        machine = (busy1 - busy0) / tick / wall
        cores["others"] = max(0.0, machine - sum(cores.values()))
        cores["machine"] = machine
        self.cores = {name: round(value, 2) for name, value in cores.items()}


def cpu_busy(window: float = 0.5) -> float:
    """The fraction of the machine's CPU that was busy over ``window`` seconds."""
    total0, busy0 = _machine_ticks()
    time.sleep(window)
    total1, busy1 = _machine_ticks()
    return (busy1 - busy0) / max(1, total1 - total0)


class QuietGate:
    """Before a measurement, wait up to ``patience`` seconds for the machine to be nearly idle.

    Another session's work on a shared machine comes and goes within seconds and takes a core
    from a stage; waiting it out makes runs comparable. ``busy_starts`` counts measurements that
    started on a busy machine all the same.
    """

    def __init__(self, patience: float, threshold: float = 0.25) -> None:
        self.patience = patience
        self.threshold = threshold
        self.busy_starts = 0
        self.waited_s = 0.0

    def wait(self) -> None:
        if self.patience <= 0:
            return
        began = time.monotonic()
        while cpu_busy() > self.threshold:
            if time.monotonic() - began >= self.patience:
                self.busy_starts += 1
                break
        self.waited_s += time.monotonic() - began


# -- one streaming request -----------------------------------------------------------------------


@frozen
class StreamResult:
    completion_tokens: int
    sent: float  # perf_counter when the request went out
    first: float  # when the first token's chunk arrived
    last: float  # when the last token's chunk arrived
    text: str

    @property
    def per_token_s(self) -> float:
        return (self.last - self.first) / max(self.completion_tokens - 1, 1)

    @property
    def ttft_s(self) -> float:
        return self.first - self.sent


def stream_chat(api_url: str, max_tokens: int, start: threading.Barrier | None = None) -> StreamResult:
    """One greedy streaming chat completion of exactly ``max_tokens`` tokens, timed per chunk."""
    url = urllib.parse.urlsplit(api_url)
    body = json.dumps(
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # skulk's extension: always max_tokens tokens
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=300)
    try:
        connection.connect()
        if start is not None:
            start.wait()
        sent = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise BenchmarkError(f"{api_url} answered {response.status}: {response.read()[:500]!r}")
        first = last = None
        usage = None
        text: list[str] = []
        for line in response:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            now = time.perf_counter()
            if "error" in event:
                raise BenchmarkError(f"{api_url} streamed an error: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", ()):
                if choice["delta"].get("content"):
                    first = first if first is not None else now
                    last = now
                    text.append(choice["delta"]["content"])
                if choice.get("finish_reason"):
                    last = now
        if usage is None or first is None or last is None:
            raise BenchmarkError(f"{api_url} ended the stream without tokens or usage")
        if usage["completion_tokens"] != max_tokens:
            raise BenchmarkError(f"{api_url} generated {usage['completion_tokens']} tokens, not {max_tokens} (ignore_eos ignored?)")
        return StreamResult(usage["completion_tokens"], sent, first, last, "".join(text))
    finally:
        connection.close()


def concurrent_streams(api_url: str, count: int, max_tokens: int) -> tuple[float, list[StreamResult]]:
    """``count`` streams started together; (aggregate tokens/s from the first send to the last token, results)."""
    start = threading.Barrier(count)
    results: list[StreamResult | BaseException | None] = [None] * count

    def one(index: int) -> None:
        try:
            results[index] = stream_chat(api_url, max_tokens, start)
        except BaseException as exc:  # reported below, in the main thread
            start.abort()
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    done = [r for r in results if isinstance(r, StreamResult)]
    errors = [r for r in results if not isinstance(r, StreamResult)]
    if errors:
        raise BenchmarkError(f"{len(errors)} of {count} concurrent streams failed: {errors[0]!r}")
    wall = max(r.last for r in done) - min(r.sent for r in done)
    return sum(r.completion_tokens for r in done) / wall, done


# -- a local cluster of real node processes ------------------------------------------------------


@frozen
class Stage:
    node_id: str
    layers: tuple[int, int]


@frozen
class Instance:
    instance_id: str
    stages: tuple[Stage, ...]


class LocalCluster:
    """``count`` real ``skulk run`` processes on loopback, joined to the first one."""

    def __init__(self, root: Path, count: int, quantize: str = "none", links: str = "direct") -> None:
        from skulk_core.testing import SkulkProcess, find_free_port

        self.root = root
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKULK_")}
        env.update(
            {
                "SKULK_HOME": str(root / "home"),
                "SKULK_CLUSTER_KEY": secrets.token_hex(16),
                "SKULK_SERVE_ENABLED": "false",
                "SKULK_SERVE_THREADS": "1",
                "SKULK_SERVE_CONTEXT_LENGTH": str(CONTEXT),
                "SKULK_SERVE_MAX_SEQUENCES": str(STREAMS),
                "SKULK_TORCH_QUANTIZE": quantize,
                "SKULK_TRANSPORT_DIRECT_LINKS": str(links == "direct").lower(),
            }
        )
        ports = [find_free_port() for _ in range(count)]
        self.processes = []
        for i, port in enumerate(ports):
            args = ["--no-autoload", "--plugin", "tcp", "--plugin", "torch", "--plugin", "openai", "--no-discovery",
                    "--transport-host", "127.0.0.1", "--transport-port", str(port), "--node-name", f"node-{i}"]
            if i:
                args += ["--peer", f"127.0.0.1:{ports[0]}"]
            process = SkulkProcess(root / f"node-{i}", args=args)
            process.env = env  # no SKULK_* variable of the caller's shell leaks in
            self.processes.append(process)
        self.by_id: dict[str, Any] = {}
        self.names: dict[str, str] = {}

    def start(self) -> None:
        # The seed first: the others dial it at start-up. (Once, on a 16-core machine, the seed
        # came up 0.4 s after the other two and /state had not listed all three after 60 s.)
        self.processes[0].start().wait_ready(120)
        for process in self.processes[1:]:
            process.start()
        for process in self.processes[1:]:
            process.wait_ready(120)
        count = len(self.processes)
        self.processes[0].wait_for(lambda: all(len(p.get("/state")["nodes"]) == count for p in self.processes), 60, f"{count} nodes joined")
        for i, process in enumerate(self.processes):
            node_id = process.get("/node_id")
            self.by_id[node_id] = process
            self.names[node_id] = f"node-{i}"

    def stop(self) -> None:
        for process in self.processes:
            try:
                process.stop(timeout=10)
            except Exception as exc:  # keep stopping the others
                log(f"stopping {process.url}: {exc}")

    def log_tails(self, chars: int = 2000) -> str:
        return "\n".join(f"--- {p.url} ({p.log_path})\n{p.log_text()[-chars:]}" for p in self.processes)

    def call(self, method: str, path: str, body: object = None) -> Any:
        request = urllib.request.Request(self.processes[0].url + path, data=None if body is None else json.dumps(body).encode(), method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise BenchmarkError(f"{method} {path} answered {exc.code}: {exc.read()[:500]!r}") from None

    def place(self, ways: int) -> Instance:
        placed = self.call("POST", "/place_instance", {"model": MODEL_ID, "backend": "torch", "min_nodes": ways})
        instance_id = placed["instance_id"]
        first = self.processes[0]
        first.wait_for(lambda: self.call("GET", f"/instance/{instance_id}")["status"] == "ready", 180, f"instance {instance_id} ready")
        found = self.call("GET", f"/instance/{instance_id}")
        instance = Instance(instance_id, tuple(Stage(s["node_id"], tuple(s["layers"])) for s in found["stages"]))
        if len(instance.stages) != ways:
            raise BenchmarkError(f"asked for {ways} stage(s), the cluster placed {len(instance.stages)}: {found}")
        for process in self.processes:  # non-head nodes load a tokenizer before they serve it
            process.wait_for(lambda p=process: p.get("/health")["models"].get(MODEL_ID) == "ready", 60, f"{MODEL_ID} ready on {process.url}")
        return instance

    def remove(self, instance: Instance) -> None:
        self.call("DELETE", f"/instance/{instance.instance_id}")
        self.processes[0].wait_for(lambda: all(not p.get("/state")["instances"] for p in self.processes), 60, "instance removed")

    def api_url(self, node_id: str) -> str:
        for node in self.processes[0].get("/state")["nodes"]:
            if node["node_id"] == node_id and node["api_url"]:
                return str(node["api_url"])
        return str(self.by_id[node_id].url)

    def other_node(self, instance: Instance) -> str:
        """A node that is not the head: one outside the instance if there is one, else the last stage's."""
        outside = [n for n in self.by_id if n not in {s.node_id for s in instance.stages}]
        return outside[0] if outside else instance.stages[-1].node_id


# -- the cluster parts ---------------------------------------------------------------------------


@define
class Placed:
    """What one placement measured."""

    stages: int
    layers: list[list[int]]
    head: str
    other: str  # the non-head node measured, and its role
    per_token_ms: list[float] = field(factory=list)  # one per run, through the head
    ttft_ms: list[float] = field(factory=list)
    per_token_other_ms: list[float] = field(factory=list)  # through the other node
    aggregate_tok_s: list[float] = field(factory=list)  # one per run, STREAMS streams through the head
    latency_cpu: list[dict[str, float]] = field(factory=list)  # cores each process used during each head run
    aggregate_cpu: list[dict[str, float]] = field(factory=list)
    loadavg: list[float] = field(factory=list)  # at the start of this placement's measurements
    text: str = ""

    @property
    def per_token_median_ms(self) -> float:
        return statistics.median(self.per_token_ms)


def measure_placements(args: argparse.Namespace, parts: set[str], root: Path, gate: QuietGate) -> dict[int, Placed]:
    ways_list = [1, 2, 3] if "latency" in parts else [1, 2]
    cluster = LocalCluster(root, NODES, args.quantize, args.links)
    results: dict[int, Placed] = {}
    try:
        log(f"starting {NODES} skulk nodes on loopback (logs under {root})")
        cluster.start()
        for ways in ways_list:
            log(f"placing {MODEL_ID} over {ways} node(s)")
            instance = cluster.place(ways)
            head_id = instance.stages[0].node_id
            other_id = cluster.other_node(instance)
            head_url, other_url = cluster.api_url(head_id), cluster.api_url(other_id)
            stage_of = {s.node_id: i for i, s in enumerate(instance.stages)}
            role = f"stage {stage_of[other_id]}" if other_id in stage_of else "no stage"
            # Each node's process, named by its role in this placement, for the CPU accounting.
            pids = {
                f"{cluster.names[n]} ({'stage ' + str(stage_of[n]) if n in stage_of else 'no stage'})": p.process.pid
                for n, p in cluster.by_id.items()
            }
            placed = Placed(ways, [list(s.layers) for s in instance.stages], cluster.names[head_id], f"{cluster.names[other_id]} ({role})")
            # Warm up: the first request of a placement allocates caches and primes every path.
            stream_chat(head_url, 8)
            stream_chat(other_url, 8)
            placed.loadavg = loadavg()
            if "latency" in parts:
                for run in range(args.runs):
                    gate.wait()
                    with CpuMeter(pids) as meter:
                        result = stream_chat(head_url, args.tokens)
                    placed.latency_cpu.append(meter.cores)
                    placed.per_token_ms.append(result.per_token_s * 1000)
                    placed.ttft_ms.append(result.ttft_s * 1000)
                    placed.text = result.text
                    gate.wait()
                    other = stream_chat(other_url, args.tokens)
                    placed.per_token_other_ms.append(other.per_token_s * 1000)
                    if other.text != result.text:
                        raise BenchmarkError(f"{ways} stage(s): greedy text differs between the head and {placed.other}")
                log(f"{ways} stage(s): {placed.per_token_median_ms:.1f} ms a token through the head, "
                    f"{statistics.median(placed.per_token_other_ms):.1f} through {placed.other}")
            if "aggregate" in parts and ways <= 2:
                for run in range(args.runs):
                    gate.wait()
                    with CpuMeter(pids) as meter:
                        rate, _ = concurrent_streams(head_url, STREAMS, args.tokens)
                    placed.aggregate_tok_s.append(rate)
                    placed.aggregate_cpu.append(meter.cores)
                log(f"{ways} stage(s): {STREAMS} streams {statistics.median(placed.aggregate_tok_s):.1f} tokens/s together; "
                    f"CPU cores {placed.aggregate_cpu[-1]}")
            results[ways] = placed
            cluster.remove(instance)
        texts = {p.text for p in results.values() if p.text}
        if len(texts) > 1:
            raise BenchmarkError(f"greedy text differs between placements: {texts}")
        return results
    except BaseException:
        log("the cluster part failed; the nodes' logs end with:\n" + cluster.log_tails())
        raise
    finally:
        cluster.stop()


# -- each stage's compute alone, for the breakdown ----------------------------------------------


def stage_child(jobs: list[dict[str, Any]], steps: int, rounds: int) -> list[dict[str, Any]]:
    """In this process, with 1 thread: each job's layer ranges as one chain of torch engines, ``batch``
    sequences decoded greedily through it; the median decode step of each stage, in ms.

    This is what a placement computes with the transport, the scheduler and HTTP taken away.
    """
    import anyio
    import numpy as np
    import torch
    from attrs import evolve

    from skulk_core import EngineOptions, ModelCard, ModelFiles, SequenceChunk, ShardRange, default_model_path
    from skulk_core.chat import render_chat
    from skulk_torch.backend import TorchBackend

    torch.set_num_threads(1)
    path = default_model_path()
    card = ModelCard.from_gguf(path)
    files = ModelFiles(card.id, "gguf", path)
    from skulk_torch import TorchSettings

    quantize = jobs[0].get("quantize", "none") if jobs else "none"
    options = EngineOptions(context_length=CONTEXT, max_sequences=STREAMS, threads=1, settings=TorchSettings(quantize=quantize))
    engines: dict[tuple[int, int], Any] = {}
    for job in jobs:
        for start, end in job["layers"]:
            if (start, end) not in engines:
                engines[(start, end)] = anyio.run(TorchBackend().load, card, files, ShardRange(start, end, card.n_layers), options)
    tokenizer = engines[tuple(jobs[0]["layers"][0])].tokenizer
    prompt = tuple(tokenizer.encode(render_chat(card.chat_template, [{"role": "user", "content": PROMPT}]), add_special=False, parse_special=True))

    async def run(job: dict[str, Any], round_: int, idle_ms: Sequence[float] | None = None) -> list[float]:
        """The median step of each stage; with ``idle_ms``, each stage first sleeps that long."""
        chain = [engines[tuple(r)] for r in job["layers"]]
        ids = [f"r{round_}-{i}" for i in range(job["batch"])]
        times: list[list[float]] = [[] for _ in chain]

        async def through(batch: list[SequenceChunk], timed: bool) -> list[Any]:
            outputs: list[Any] = []
            for index, engine in enumerate(chain):
                if idle_ms and timed:
                    time.sleep(idle_ms[index] / 1000)  # blocking: nothing else runs meanwhile
                t = time.perf_counter()
                outputs = await engine.step(batch)
                if timed:
                    times[index].append(time.perf_counter() - t)
                batch = [evolve(c, tokens=None, hidden=o.hidden) for c, o in zip(batch, outputs)]
            return outputs

        outputs = await through([SequenceChunk(i, 0, prompt) for i in ids], False)
        for step in range(steps):
            tokens = [int(np.argmax(o.logits)) for o in outputs]
            outputs = await through([SequenceChunk(i, len(prompt) + step, (t,)) for i, t in zip(ids, tokens)], True)
        for engine in chain:
            for i in ids:
                await engine.release(i)
        return [statistics.median(t) * 1000 for t in times]

    results = [{**job, "stage_ms": [math.inf] * len(job["layers"])} for job in jobs]
    for round_ in range(rounds):  # rounds interleave the jobs; the fastest round is the least disturbed
        for job, result in zip(jobs, results):
            measured = anyio.run(run, job, round_)
            if sum(measured) < sum(result["stage_ms"]):
                result["stage_ms"] = measured
    # A pipeline's stage sits idle while the others compute. Each stage again, after sleeping as
    # long as the other stages' steps take: what idling alone costs it, with no other work around.
    for round_ in range(rounds):
        for job, result in zip(jobs, results):
            if job["batch"] != 1 or len(job["layers"]) < 2:
                continue
            busy = result["stage_ms"]
            measured = anyio.run(run, job, rounds + round_, [sum(busy) - own for own in busy])
            if sum(measured) < sum(result.get("stage_idle_ms", [math.inf])):
                result["stage_idle_ms"] = measured
    return results


def measure_stages(args: argparse.Namespace, placed: dict[int, Placed]) -> list[dict[str, Any]]:
    """Each placement's stages computed alone, in a child process (batch 1 for latency, the lanes'
    batches for the aggregate)."""
    jobs = []
    for ways, p in sorted(placed.items()):
        if p.per_token_ms:
            jobs.append({"stages": ways, "layers": p.layers, "batch": 1, "quantize": args.quantize})
        if p.aggregate_tok_s:
            jobs.append({"stages": ways, "layers": p.layers, "batch": STREAMS // ways, "quantize": args.quantize})  # one lane per stage
    log(f"each placement's stages computed alone, 1 thread, no transport ({len(jobs)} chains)")
    command = [sys.executable, __file__, "--stage-child", json.dumps(jobs), "--tokens", str(min(args.tokens, 32)), "--runs", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchmarkError(f"the stage child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return list(json.loads(line.removeprefix("RESULT ")))


PROMPT_POSITIONS = 24  # the lane children's prompt, about as long as the measured streams' chat prompt
LANE_SECONDS = 2.0  # how long the stages of a 2-stage placement compute at once, for the breakdown


def lane_child(job: dict[str, Any]) -> dict[str, Any]:
    """One stage of a 2-stage placement in this process, 1 thread, decoding ``batch`` sequences step
    after step while the other stage's process does the same: what each stage computes when the
    pipeline is full, on a machine whose cores share one memory. Prints READY once loaded, starts
    at the wall-clock instant the parent writes on stdin, and stops ``LANE_SECONDS`` later.

    The first stage is fed a prompt of ``PROMPT_POSITIONS`` tokens and then one token a step; a later
    stage is fed random activations (a step's time does not depend on the values).
    """
    import anyio
    import numpy as np
    import torch

    from skulk_core import EngineOptions, ModelCard, ModelFiles, SequenceChunk, ShardRange, default_model_path
    from skulk_core.tensor import Tensor
    from skulk_torch.backend import TorchBackend

    torch.set_num_threads(1)
    path = default_model_path()
    card = ModelCard.from_gguf(path)
    start, end = job["layers"]
    from skulk_torch import TorchSettings

    options = EngineOptions(context_length=CONTEXT, max_sequences=STREAMS, threads=1, settings=TorchSettings(quantize=job.get("quantize", "none")))
    engine = anyio.run(TorchBackend().load, card, ModelFiles(card.id, "gguf", path), ShardRange(start, end, card.n_layers), options)
    ids = [f"lane-{i}" for i in range(job["batch"])]
    rng = np.random.default_rng(0)

    def chunk(request_id: str, position: int, count: int, token: int = 0) -> SequenceChunk:
        if start == 0:
            return SequenceChunk(request_id, position, (token,) * count)
        return SequenceChunk(request_id, position, hidden=Tensor.from_numpy(rng.standard_normal((count, card.hidden_size), dtype=np.float32)))

    async def run() -> list[float]:
        await engine.step([chunk(i, 0, PROMPT_POSITIONS, 1) for i in ids])
        print("READY", flush=True)
        begin = float(sys.stdin.readline())
        await anyio.sleep(max(0.0, begin - time.time()))
        times, position = [], PROMPT_POSITIONS
        while time.time() < begin + LANE_SECONDS and position < CONTEXT:
            batch = [chunk(i, position, 1, 1) for i in ids]  # built before the clock starts
            t = time.perf_counter()
            await engine.step(batch)
            times.append(time.perf_counter() - t)
            position += 1
        await engine.close()
        return times

    times = anyio.run(run)
    return {**job, "steps": len(times), "step_ms": statistics.median(times) * 1000}


def measure_lanes(placed: dict[int, Placed], gate: QuietGate, quantize: str = "none") -> dict[str, Any] | None:
    """The 2-stage placement's stages computing at once, one process each (see :func:`lane_child`)."""
    two = placed.get(2)
    if two is None or not two.aggregate_tok_s:
        return None
    batch = STREAMS // 2
    log(f"the 2 stages computing at once, {batch} sequences each, one process each, {LANE_SECONDS:.0f} s")
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--lane-child", json.dumps({"layers": layers, "batch": batch, "quantize": quantize})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for layers in two.layers
    ]
    try:
        for child in children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "READY":
                raise BenchmarkError(f"a lane child failed to start:\n{child.communicate(timeout=30)[1][-3000:]}")
        gate.wait()
        begin = time.time() + 0.2
        for child in children:  # every child hears the instant before any is waited for
            assert child.stdin is not None
            child.stdin.write(f"{begin}\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, err = child.communicate(timeout=120)
            line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
            if child.returncode != 0 or line is None:
                raise BenchmarkError(f"a lane child failed ({child.returncode}):\n{err[-3000:]}")
            results.append(json.loads(line.removeprefix("RESULT ")))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return {"batch": batch, "layers": two.layers, "step_ms": [r["step_ms"] for r in results], "steps": [r["steps"] for r in results]}


# -- the torch stage alone against transformers ---------------------------------------------------


def transformers_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "accelerate"))


def torch_child(tokens: int, runs: int, gate: QuietGate, device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    """In this process: load the skulk torch stage and transformers' model, decode greedily with both."""
    import anyio
    import numpy as np

    result: dict[str, Any] = {"threads": 2, "device": device, "dtype": dtype}
    started = time.perf_counter()
    import torch

    result["import_torch_s"] = time.perf_counter() - started
    torch.set_num_threads(2)
    from skulk_core import EngineOptions, ModelCard, ModelFiles, SequenceChunk, ShardRange, default_model_path
    from skulk_core.chat import render_chat
    from skulk_torch import TorchBackend, TorchSettings

    path = default_model_path()
    card = ModelCard.from_gguf(path)
    files = ModelFiles(card.id, "gguf", path)
    started = time.perf_counter()
    engine = anyio.run(TorchBackend().load, card, files, ShardRange.whole(card.n_layers), EngineOptions(context_length=CONTEXT, max_sequences=4, threads=2, device=device, settings=TorchSettings(dtype=dtype)))
    result["skulk_load_s"] = time.perf_counter() - started
    # The prompt as a node renders and tokenizes it; both models get the same token ids.
    text = render_chat(card.chat_template, [{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = engine.tokenizer.encode(text, add_special=False, parse_special=True)
    result["prompt_tokens"] = len(prompt)

    def skulk_decode(run: int) -> tuple[float, list[int]]:
        async def go() -> tuple[float, list[int]]:
            request_id = f"bench-{run}"
            (out,) = await engine.step([SequenceChunk(request_id, 0, tuple(prompt))])
            generated = [int(np.argmax(out.logits))]
            position, elapsed = len(prompt), 0.0
            while len(generated) < tokens:
                t = time.perf_counter()
                (out,) = await engine.step([SequenceChunk(request_id, position, (generated[-1],))])
                generated.append(int(np.argmax(out.logits)))
                elapsed += time.perf_counter() - t
                position += 1
            await engine.release(request_id)
            return (len(generated) - 1) / elapsed, generated

        return anyio.run(go)

    if not transformers_available():
        result["transformers"] = None
        result["skulk_decode_tok_s"], result["others_cores"] = [], []
        for run in range(runs):
            gate.wait()
            with CpuMeter({}) as meter:
                result["skulk_decode_tok_s"].append(skulk_decode(run)[0])
            result["others_cores"].append(meter.cores["others"])
        return result

    started = time.perf_counter()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    result["transformers"] = transformers.__version__
    result["import_transformers_s"] = time.perf_counter() - started
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    result["transformers_tokenizer_load_s"] = time.perf_counter() - started
    # transformers computes on the thread skulk's CPU engines step on: one OpenMP team for both
    # (a second thread's team would throttle both, see skulk_core.threads).
    from skulk_core import compute_thread

    def on_compute_thread(func: Callable[[], Any]) -> Any:
        return anyio.run(compute_thread().run, func)

    started = time.perf_counter()
    model = on_compute_thread(
        lambda: AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)).to(device)
    )
    model.eval()
    result["transformers_model_load_s"] = time.perf_counter() - started
    result["transformers_load_s"] = result["transformers_tokenizer_load_s"] + result["transformers_model_load_s"]
    theirs_prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    result["prompt_tokens_agree"] = list(theirs_prompt) == list(prompt)

    class Timestamps(BaseStreamer):
        """generate() calls put() with the prompt, then once per generated token."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())
            self.tokens.extend(int(t) for t in value.reshape(-1))

        def end(self) -> None:
            pass

    def transformers_decode() -> tuple[float, list[int]]:
        torch.set_num_threads(2)
        ids = torch.tensor([prompt], device=device)
        streamer = Timestamps()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,  # as ignore_eos: exactly `tokens` tokens
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                streamer=streamer,
            )
        return (len(streamer.times) - 1) / (streamer.times[-1] - streamer.times[0]), streamer.tokens

    ours, theirs = [], []
    ours_tokens = theirs_tokens = []
    others: list[float] = []
    for run in range(runs):  # interleaved, so the machine's noise falls on both alike
        gate.wait()
        with CpuMeter({}) as meter:
            rate, ours_tokens = skulk_decode(run)
        ours.append(rate)
        others.append(meter.cores["others"])
        gate.wait()
        with CpuMeter({}) as meter:
            rate, theirs_tokens = on_compute_thread(transformers_decode)
        theirs.append(rate)
        others.append(meter.cores["others"])
    result["skulk_decode_tok_s"] = ours
    result["transformers_decode_tok_s"] = theirs
    result["others_cores"] = others
    agree = 0
    for a, b in zip(ours_tokens, theirs_tokens):
        if a != b:
            break
        agree += 1
    result["greedy_tokens_agree"] = agree
    return result


def measure_torch(args: argparse.Namespace) -> dict[str, Any]:
    if not transformers_available():
        missing = [name for name in ("transformers", "accelerate") if importlib.util.find_spec(name) is None]
        log(f"{' and '.join(missing)} not installed: the transformers comparison is skipped. To run it:\n    {TRANSFORMERS_INSTALL}")
    log(f"torch stage alone against transformers (one child process, 2 threads, {args.torch_device}, {args.torch_dtype})")
    before = loadavg()
    command = [sys.executable, __file__, "--torch-child", "--tokens", str(args.tokens), "--runs", str(args.runs), "--quiet-wait", str(args.quiet_wait),
               "--torch-device", args.torch_device, "--torch-dtype", args.torch_dtype]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise BenchmarkError(f"the torch child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(line.removeprefix("RESULT "))
    result["loadavg"] = before
    if result["transformers"] is None:
        result["install"] = TRANSFORMERS_INSTALL
    return result


# -- the report ----------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _others(*cpu_lists: Sequence[dict[str, float]]) -> float:
    """The largest median CPU use of other processes over the measurements named, in cores."""
    return max((_median([c["others"] for c in cpu]) for cpu in cpu_lists if cpu), default=0.0)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the CPU that other processes took meanwhile (``others``)."""
    rows = []
    placed = {int(k): v for k, v in report.get("placements", {}).items()}

    def row(what: str, value: float, target: str, met: bool, unit: str, others: float) -> None:
        rows.append({"what": what, "value": round(value, 3), "target": target, "met": met, "unit": unit, "others_cores": round(others, 2)})

    if placed.get(1) and placed[1]["per_token_ms"]:
        base = _median(placed[1]["per_token_ms"])
        for ways in (2, 3):
            if placed.get(ways) and placed[ways]["per_token_ms"]:
                ratio = _median(placed[ways]["per_token_ms"]) / base
                row(f"{ways}-stage / 1-stage per-token latency", ratio, f"<= {TARGET_LATENCY}x", ratio <= TARGET_LATENCY, "x",
                    _others(placed[1]["latency_cpu"], placed[ways]["latency_cpu"]))
    if placed.get(1) and placed[1]["aggregate_tok_s"] and placed.get(2) and placed[2]["aggregate_tok_s"]:
        ratio = _median(placed[2]["aggregate_tok_s"]) / _median(placed[1]["aggregate_tok_s"])
        row(f"2-stage / 1-stage aggregate tokens/s, {STREAMS} streams", ratio, f">= {TARGET_AGGREGATE}x", ratio >= TARGET_AGGREGATE, "x",
            _others(placed[1]["aggregate_cpu"], placed[2]["aggregate_cpu"]))
    torch_part = report.get("torch")
    if torch_part:
        others = _median(torch_part["others_cores"])
        if torch_part.get("transformers"):
            ratio = _median(torch_part["skulk_decode_tok_s"]) / _median(torch_part["transformers_decode_tok_s"])
            row("skulk torch / transformers decode tokens/s", ratio, f">= {TARGET_DECODE}x", ratio >= TARGET_DECODE, "x", others)
        load = torch_part["skulk_load_s"]
        row("skulk torch load, whole model", load, f"< {TARGET_LOAD_S:.0f} s", load < TARGET_LOAD_S, "s", others)
    return rows


def print_table(report: dict[str, Any]) -> None:
    med = _median

    def spread(values: Sequence[float], fmt: str = ".1f") -> str:
        return f"{med(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})" if len(values) > 1 else f"{values[0]:{fmt}}"

    print(f"Skulk pipeline benchmark: {MODEL_ID}, torch backend, {report['tokens']} tokens a stream, {report['runs']} runs (median, min-max)")
    print(f"machine: {report['machine']}; load average (1, 5, 15 min) at start {report['loadavg_start']}, at end {report['loadavg_end']}")
    gate = report["quiet_gate"]
    print(f"waited {gate['waited_s']:.0f} s in all for a quiet machine; {gate['busy_starts']} measurement(s) started on a busy one")
    placed = {int(k): v for k, v in report.get("placements", {}).items()}
    if any(p["per_token_ms"] for p in placed.values()):
        quantized = "" if report.get("quantize", "none") == "none" else f", torch.quantize {report['quantize']}"
        quantized += ", steps on the transport" if report.get("links") == "transport" else ""
        print(f"\nPer-token latency, one stream, greedy, 1 thread a stage{quantized}, through the head's streaming chat endpoint")
        print(f"  {'stages':<8}{'layers':<24}{'ms a token':<20}{'tokens/s':<10}{'first token':<13}{'vs 1 stage':<12}{'others, cores':<14}")
        base = med(placed[1]["per_token_ms"]) if placed.get(1) and placed[1]["per_token_ms"] else None
        for ways, p in sorted(placed.items()):
            if not p["per_token_ms"]:
                continue
            ratio = f"{med(p['per_token_ms']) / base:.2f}x" if base else "-"
            layers = " ".join(f"[{a},{b})" for a, b in p["layers"])
            others = f"{med([c['others'] for c in p['latency_cpu']]):.2f}"
            print(f"  {ways:<8}{layers:<24}{spread(p['per_token_ms']):<20}{1000 / med(p['per_token_ms']):<10.1f}"
                  f"{med(p['ttft_ms']):<4.0f}{'ms':<9}{ratio:<12}{others:<14}")
        alone = {job["stages"]: job["stage_ms"] for job in report.get("stages_alone", ()) if job["batch"] == 1}
        idle = {job["stages"]: job["stage_idle_ms"] for job in report.get("stages_alone", ()) if "stage_idle_ms" in job}
        if alone:
            print("  breakdown: the same stages computed alone, one process, 1 thread, no transport; the rest is the difference")
            rest1 = med(placed[1]["per_token_ms"]) - sum(alone[1]) if 1 in alone and placed.get(1) else None
            for ways, p in sorted(placed.items()):
                if ways in alone and p["per_token_ms"]:
                    rest = med(p["per_token_ms"]) - sum(alone[ways])
                    hops = f"; {(rest - rest1) / ways:+.1f} ms a message hop against 1 stage ({ways} hops)" if rest1 is not None and ways > 1 else ""
                    print(f"  {ways:<8}compute {' + '.join(f'{t:.1f}' for t in alone[ways])} = {sum(alone[ways]):.1f} ms, "
                          f"rest {rest:.1f} ms (HTTP, scheduler, transport, contention){hops}")
                    if ways in idle:
                        print(f"  {'':<8}each stage after sleeping while the others compute: {' + '.join(f'{t:.1f}' for t in idle[ways])} "
                              f"= {sum(idle[ways]):.1f} ms ({sum(idle[ways]) - sum(alone[ways]):+.1f} ms for having sat idle)")
        print("  extra: through a node that is not the head (the data plane forwards every chunk)")
        for ways, p in sorted(placed.items()):
            if p["per_token_other_ms"]:
                print(f"  {ways:<8}{'via ' + p['other']:<24}{spread(p['per_token_other_ms']):<20}{1000 / med(p['per_token_other_ms']):<10.1f}")
    if any(p["aggregate_tok_s"] for p in placed.values()):
        print(f"\nAggregate tokens/s, {STREAMS} concurrent greedy streams through the head, 1 thread a stage")
        for ways, p in sorted(placed.items()):
            if not p["aggregate_tok_s"]:
                continue
            names = [n for n in p["aggregate_cpu"][0] if n != "machine"]
            used = ", ".join(f"{n} {med([c[n] for c in p['aggregate_cpu']]):.2f}" for n in names if med([c[n] for c in p["aggregate_cpu"]]) >= 0.01)
            print(f"  {ways} stage(s): {spread(p['aggregate_tok_s'])} tokens/s together; CPU cores used: {used}")
        jobs = {job["stages"]: job for job in report.get("stages_alone", ()) if job["batch"] > 1}
        if 1 in jobs and 2 in jobs:
            one, two = jobs[1], jobs[2]
            ideal1 = 1000 * one["batch"] / one["stage_ms"][0]
            # 2 lanes, each stage on a core of its own: the slower stage sets the pace of both lanes
            ideal2 = 1000 * two["batch"] / max(two["stage_ms"])
            print(f"  breakdown: stages computed alone, 1 thread: 1 stage, {one['batch']} sequences a step, {one['stage_ms'][0]:.1f} ms "
                  f"= {ideal1:.1f} tokens/s;\n    2 stages, {two['batch']} sequences a lane, {' and '.join(f'{t:.1f}' for t in two['stage_ms'])} ms "
                  f"= at best {ideal2:.1f} tokens/s with a free core for each stage ({ideal2 / ideal1:.2f}x)")
            lanes = report.get("lanes_at_once")
            if lanes:
                at_once = 1000 * lanes["batch"] / max(lanes["step_ms"])
                print(f"    the 2 stages computing at once, a process each, as in a full pipeline: {' and '.join(f'{t:.1f}' for t in lanes['step_ms'])} ms "
                      f"= at best {at_once:.1f} tokens/s on this machine ({at_once / ideal1:.2f}x)")
    torch_part = report.get("torch")
    if torch_part:
        print(f"\nThe torch stage alone against transformers' generate: same GGUF, one process, "
              f"{torch_part.get('dtype', 'float32')} on {torch_part.get('device', 'cpu')}, 2 threads, {report['tokens']} tokens, greedy")
        print(f"  {'':<34}{'load':<10}{'decode tokens/s':<20}")
        print(f"  {'skulk torch, engine.step + argmax':<34}{torch_part['skulk_load_s']:<6.2f}{'s':<4}{spread(torch_part['skulk_decode_tok_s']):<20}")
        if torch_part.get("transformers"):
            print(f"  {'transformers ' + torch_part['transformers'] + ', generate':<34}{torch_part['transformers_load_s']:<6.1f}{'s':<4}"
                  f"{spread(torch_part['transformers_decode_tok_s']):<20}")
            print(f"  transformers' load: tokenizer {torch_part['transformers_tokenizer_load_s']:.1f} s + model {torch_part['transformers_model_load_s']:.1f} s "
                  f"(import transformers {torch_part['import_transformers_s']:.1f} s, import torch {torch_part['import_torch_s']:.1f} s, in neither)")
            print(f"  same prompt token ids: {torch_part['prompt_tokens_agree']}; "
                  f"greedy tokens agree for the first {torch_part['greedy_tokens_agree']} of {report['tokens']}")
        else:
            print(f"  transformers: skipped, not installed. To run it: {torch_part['install']}")
        print(f"  other processes used {med(torch_part['others_cores']):.2f} cores meanwhile")
    rows = report["targets"]
    if rows:
        print("\nTargets (issue 5)                                     value     target    others, cores")
        for r in rows:
            value = f"{r['value']:.2f}{' s' if r['unit'] == 's' else 'x'}"
            print(f"  {r['what']:<52}{value:<10}{r['target']:<10}{r['others_cores']:<6.2f}{'met' if r['met'] else 'MISSED'}")
        print(f"  'others': CPU that processes outside this benchmark used during the measurements (of {report.get('cpus')} cores)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["latency", "aggregate", "torch"], help="run one part only")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per stream (default 64)")
    parser.add_argument("--torch-device", default="cpu", help="where the torch part runs both models: cpu (default), cuda, mps")
    parser.add_argument("--torch-dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="the torch part's element type (default float32)")
    parser.add_argument(
        "--quantize", default="none", choices=["none", "int8", "int4"],
        help="torch.quantize of the nodes' stages and the breakdown (default none; the torch part compares float32 with transformers and ignores it)",
    )
    parser.add_argument(
        "--links", default="direct", choices=["direct", "transport"],
        help="how steps travel between the nodes' stages: direct stage links (default) or the transport",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument(
        "--quiet-wait", type=float, default=3.0, help="seconds to wait before each measurement for the machine to go idle (default 3; 0: never)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the nodes' logs (their folder is printed)")
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage-child", help=argparse.SUPPRESS)
    parser.add_argument("--lane-child", help=argparse.SUPPRESS)
    parser.add_argument("--no-breakdown", action="store_true", help="skip computing each placement's stages alone")
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.runs < 1:
        parser.error("--tokens must be at least 2 and --runs at least 1")
    if args.stage_child:
        print("RESULT " + json.dumps(stage_child(json.loads(args.stage_child), args.tokens, args.runs)), flush=True)
        return 0
    if args.lane_child:
        print("RESULT " + json.dumps(lane_child(json.loads(args.lane_child))), flush=True)
        return 0
    if args.torch_child:
        print("RESULT " + json.dumps(torch_child(args.tokens, args.runs, QuietGate(args.quiet_wait), args.torch_device, args.torch_dtype)), flush=True)
        return 0
    parts = {args.only} if args.only else {"latency", "aggregate", "torch"}
    report: dict[str, Any] = {
        "model": MODEL_ID,
        "tokens": args.tokens,
        "runs": args.runs,
        "quantize": args.quantize,
        "links": args.links,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
    }
    started = time.monotonic()
    gate = QuietGate(args.quiet_wait)
    root = Path(tempfile.mkdtemp(prefix="skulk-pipeline-bench-"))
    try:
        if "torch" in parts:
            report["torch"] = measure_torch(args)
        if parts & {"latency", "aggregate"}:
            placed = measure_placements(args, parts, root, gate)
            report["placements"] = {str(k): asdict(v) for k, v in placed.items()}
            if not args.no_breakdown:
                report["stages_alone"] = measure_stages(args, placed)
                report["lanes_at_once"] = measure_lanes(placed, gate, args.quantize)
    finally:
        if args.keep_logs:
            log(f"logs kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report["loadavg_end"] = loadavg()
    report["quiet_gate"] = {"patience_s": gate.patience, "waited_s": round(gate.waited_s, 1), "busy_starts": gate.busy_starts}
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["targets"] = targets(report)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
        print(f"\n({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
