"""One model split over several real node processes: placement, the pipeline, re-placement.

Needs the skulk-tcp, skulk-torch and skulk-openai plugins, which `make install` installs.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from skulk_core.testing import SkulkProcess, find_free_port, write_synthetic_gguf

pytest.importorskip("skulk_tcp", reason="the TCP transport plugin is not installed")
pytest.importorskip("skulk_torch", reason="the torch backend plugin is not installed")
pytest.importorskip("skulk_openai", reason="the OpenAI frontend plugin is not installed")
psutil = pytest.importorskip("psutil")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ENV = {
    "SKULK_CLUSTER_KEY": "pipeline-test-key",
    "SKULK_SERVE_ENABLED": "false",
    "SKULK_SERVE_THREADS": "1",
    "SKULK_SERVE_CONTEXT_LENGTH": "512",
    "SKULK_SERVE_MAX_SEQUENCES": "4",
    "SKULK_CLUSTER_HEARTBEAT_INTERVAL": "0.3",
    "SKULK_CLUSTER_NODE_TIMEOUT": "2.0",
}


def start_cluster(
    skulk_process: Callable[..., SkulkProcess], count: int, extra: Sequence[Sequence[str]] = (), envs: Sequence[dict[str, str]] = ()
) -> list[SkulkProcess]:
    ports = [find_free_port() for _ in range(count)]
    nodes = []
    for i, port in enumerate(ports):
        args = ["--no-autoload", "--plugin", "tcp", "--plugin", "torch", "--plugin", "openai",
                "--transport-host", "127.0.0.1", "--transport-port", str(port), "--no-discovery", "--node-name", f"node-{i}"]
        if i:
            args += ["--peer", f"127.0.0.1:{ports[0]}"]
        args += list(extra[i]) if i < len(extra) else []
        nodes.append(skulk_process(args, env={**ENV, **(envs[i] if i < len(envs) else {})}))
    for node in nodes:
        node.wait_ready(60)
    try:
        nodes[0].wait_for(lambda: all(len(n.get("/state")["nodes"]) == count for n in nodes), 30, f"{count} nodes joined")  # type: ignore[index]
    except TimeoutError as exc:
        logs = "\n\n".join(f"--- {n.url}\n{n.log_text()[-2000:]}" for n in nodes[1:])
        raise TimeoutError(f"{exc}\n{logs}") from None
    return nodes


def call(node: SkulkProcess, method: str, path: str, body: object = None) -> dict:
    request = urllib.request.Request(node.url + path, data=None if body is None else json.dumps(body).encode(), method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def place(node: SkulkProcess, model: str, min_nodes: int, backend: str = "torch") -> dict:
    placed = call(node, "POST", "/place_instance", {"model": model, "backend": backend, "min_nodes": min_nodes})
    instance_id = placed["instance_id"]
    node.wait_for(lambda: call(node, "GET", f"/instance/{instance_id}")["status"] == "ready", 120, f"instance {instance_id} ready")
    return call(node, "GET", f"/instance/{instance_id}")


def ready_everywhere(nodes: Sequence[SkulkProcess], model: str) -> None:
    for node in nodes:
        node.wait_for(lambda: node.get("/health")["models"].get(model) == "ready", 30, f"{model} ready on {node.url}")  # type: ignore[index]


def greedy(node: SkulkProcess, model: str = MODEL, max_tokens: int = 16) -> str:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colours of the rainbow."}], max_tokens=max_tokens, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    return reply.choices[0].message.content or ""


def seeded(node: SkulkProcess, model: str = MODEL) -> tuple[str, list[tuple[int, ...]]]:
    """A sampled (not greedy) answer with log-probabilities: (text, per token its top-3 token bytes)."""
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me about foxes."}], max_tokens=12,
        temperature=0.9, top_p=0.95, seed=31337, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    return reply.choices[0].message.content or "", [tuple(b for t in c.top_logprobs for b in (t.bytes or [])) for c in content]


def scored(node: SkulkProcess, model: str = MODEL) -> tuple[list[str], list[float | None]]:
    """A prompt scored (echo, logprobs, max_tokens 0): its tokens and their log-probabilities."""
    reply = call(node, "POST", "/v1/completions", {"model": model, "prompt": "Foxes live in dens and hunt at night.", "echo": True, "logprobs": 2, "max_tokens": 0})
    logprobs = reply["choices"][0]["logprobs"]
    return logprobs["tokens"], logprobs["token_logprobs"]


def node_ids(nodes: Sequence[SkulkProcess]) -> dict[str, SkulkProcess]:
    return {n.get("/node_id"): n for n in nodes}  # type: ignore[misc]


def split_in_two(nodes: Sequence[SkulkProcess]) -> tuple[SkulkProcess, SkulkProcess, str]:
    """Place the default model over two of ``nodes``; (the head's node, stage 1's node, its id)."""
    instance = place(nodes[0], MODEL, 2)
    ready_everywhere(nodes, MODEL)
    by_id = node_ids(nodes)
    second = instance["stages"][1]["node_id"]
    return by_id[instance["stages"][0]["node_id"]], by_id[second], second


def test_split_one_two_and_three_ways_gives_the_same_greedy_tokens(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes = start_cluster(skulk_process, 3)
    texts, sampled, scores = {}, {}, {}
    for ways in (1, 2, 3):
        instance = place(nodes[0], MODEL, ways)
        assert len(instance["stages"]) == ways
        layers = [tuple(s["layers"]) for s in instance["stages"]]
        assert layers[0][0] == 0 and layers[-1][1] == 30
        ready_everywhere(nodes, MODEL)
        # every node's endpoint serves it, whichever node heads the pipeline
        answers = {greedy(node) for node in nodes}
        assert len(answers) == 1, answers
        texts[ways] = answers.pop()
        # seeded sampling with log-probabilities: drawn at the last stage when split, at the head
        # when whole, with the same seed, so the same tokens and the same alternatives
        sampled[ways] = seeded(nodes[-1])
        # a prompt's scores are computed at the last stage and travel back with the step
        scores[ways] = scored(nodes[1])
        call(nodes[0], "DELETE", f"/instance/{instance['instance_id']}")
        nodes[0].wait_for(lambda: all(not n.get("/state")["instances"] for n in nodes), 20, "instance removed")  # type: ignore[index]
    assert texts[1] == texts[2] == texts[3], texts
    assert texts[1].strip()
    # the steps went stage to stage on direct links (skulk_core.links): in the 3-way placement
    # every node opened one to the next stage, the last one's to the head
    for node in nodes:
        assert "opened a direct link to stage" in node.log_text(), node.log_text()[-3000:]
    assert sampled[1] == sampled[2] == sampled[3], sampled
    assert sampled[1][0].strip() and len(sampled[1][1]) > 3
    tokens, logprobs = scores[1]
    assert len(tokens) > 5 and logprobs[0] is None and all(value < 0 for value in logprobs[1:])
    for ways in (2, 3):
        assert scores[ways][0] == tokens and scores[ways][1][1:] == pytest.approx(logprobs[1:], abs=1e-3), ways


def test_a_model_over_one_nodes_memory_limit_is_placed_over_two(skulk_process: Callable[..., SkulkProcess], tmp_path: Path) -> None:
    from skulk_core import EngineOptions, ModelCard, ShardRange
    from skulk_torch.backend import TorchBackend

    model = write_synthetic_gguf(tmp_path / "wide-synthetic.gguf", n_layers=8, hidden=768, ffn=2048, heads=8, kv_heads=2)
    # A limit between what the whole model needs and what its bigger half needs, from the torch
    # backend's own estimate, so the test follows the estimate rather than hard-coding it.
    card, backend = ModelCard.from_gguf(model), TorchBackend()
    options = EngineOptions(context_length=int(ENV["SKULK_SERVE_CONTEXT_LENGTH"]), max_sequences=int(ENV["SKULK_SERVE_MAX_SEQUENCES"]))
    whole = backend.estimate_memory(card, ShardRange(0, 8, 8), options)
    half = max(backend.estimate_memory(card, ShardRange(0, 4, 8), options), backend.estimate_memory(card, ShardRange(4, 8, 8), options))
    assert half < whole
    limit = ["--memory-limit", str(int((half + whole) / 2 / 0.95))]
    # Direct links off on one node: the steps go on the transport both ways, as they do for a
    # node whose links are off or cannot be opened.
    nodes = start_cluster(skulk_process, 2, [limit, limit], envs=[{}, {"SKULK_TRANSPORT_DIRECT_LINKS": "false"}])
    previews = call(nodes[0], "GET", f"/instance/previews?model={model}&backend=torch")["previews"]
    assert previews[0]["placement"] is None and "needs" in previews[0]["error"]  # one node is too small, with numbers
    assert previews[1]["placement"] is not None
    instance = place(nodes[1], str(model), 1)
    assert len(instance["stages"]) == 2, instance
    ready_everywhere(nodes, "wide-synthetic")
    assert greedy(nodes[0], "wide-synthetic", max_tokens=8) == greedy(nodes[1], "wide-synthetic", max_tokens=8)
    assert "opened a direct link" not in nodes[0].log_text() + nodes[1].log_text()
    # node 0 asked for a link to the other stage (whichever it holds) and was told no
    assert "direct stage links are off on that node" in nodes[0].log_text()


def test_placement_that_cannot_fit_says_so_with_numbers(skulk_process: Callable[..., SkulkProcess], tmp_path: Path) -> None:
    model = write_synthetic_gguf(tmp_path / "too-big.gguf", n_layers=8, hidden=512, ffn=1536, heads=8, kv_heads=2)
    nodes = start_cluster(skulk_process, 1, [["--memory-limit", "40MiB"]])
    with pytest.raises(urllib.error.HTTPError) as caught:
        call(nodes[0], "POST", "/place_instance", {"model": str(model), "backend": "torch"})
    assert caught.value.code == 409
    message = json.load(caught.value)["error"]["message"]
    assert "needs" in message and "MiB" in message


def test_killing_a_stage_mid_stream_errors_cleanly_and_the_model_is_placed_again(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes = start_cluster(skulk_process, 3)
    head, victim, victim_node_id = split_in_two(nodes)
    master_id = nodes[0].get("/state")["master_id"]  # type: ignore[index]
    client_node = head
    client = openai.OpenAI(base_url=client_node.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    outcome: dict[str, object] = {}

    def stream() -> None:
        text = ""
        try:
            for chunk in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Tell me a long story about a fox."}], max_tokens=400, temperature=0, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    outcome["started"] = True
            outcome["finished"] = text
        except Exception as exc:  # the clean error we expect
            outcome["error"] = exc

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 30
    while "started" not in outcome and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome.get("started"), outcome
    victim.kill()
    thread.join(60)
    assert not thread.is_alive(), "the stream hung after its stage died"
    assert "error" in outcome, outcome  # a stream that had produced tokens ends with an error, not a hang
    survivors = [n for n in nodes if n is not victim]
    # the master (maybe re-elected) places the model again on the nodes left, with no user action
    survivors[0].wait_for(
        lambda: any(i["status"] == "ready" and victim_node_id not in [s["node_id"] for s in i["stages"]] for i in survivors[0].get("/state")["instances"]),  # type: ignore[index]
        60,
        "the model placed again without the dead node",
    )
    ready_everywhere(survivors, MODEL)
    assert greedy(survivors[0]).strip()
    assert greedy(survivors[1]).strip()
    assert master_id  # the cluster kept a master throughout


def test_a_request_with_no_token_yet_is_retried_on_the_new_placement(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes = start_cluster(skulk_process, 2)
    head, victim, _ = split_in_two(nodes)
    # A prompt of about 400 tokens: its prefill takes seconds on one thread a stage, so the stage
    # dies while the request is still in it, before any token.
    messages = [{"role": "user", "content": "Repeat after me: " + "fox river moon " * 130 + ". What did I say?"}]
    client = openai.OpenAI(base_url=head.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    outcome: dict[str, object] = {}

    def ask() -> None:
        try:
            outcome["reply"] = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=ask)
    thread.start()
    head.wait_for(lambda: _stage_busy(head), 10, "the prefill started")
    victim.kill()
    thread.join(100)
    assert not thread.is_alive(), "the request hung after its stage died"
    assert "error" not in outcome, outcome  # retried, not failed
    reply = outcome["reply"]
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8  # type: ignore[attr-defined]
    assert "retrying on the next placement" in head.log_text()
    placed = head.get("/state")["instances"]  # type: ignore[index]
    assert [s["node_id"] for s in placed[0]["stages"]] == [head.get("/node_id")]  # the head alone now
    # the same request on the new placement gives the same greedy tokens
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == reply.choices[0].message.content  # type: ignore[attr-defined]


def _stage_busy(node: SkulkProcess) -> bool:
    """True once the node's process has used CPU for a while since the last call (its stage computes)."""
    process = psutil.Process(node.process.pid)  # type: ignore[union-attr]
    before = sum(process.cpu_times()[:2])
    time.sleep(0.2)
    return sum(process.cpu_times()[:2]) - before > 0.1


def test_stage_memory_is_roughly_proportional_to_its_layers(skulk_process: Callable[..., SkulkProcess]) -> None:
    nodes = start_cluster(skulk_process, 3)
    pids = {n.get("/node_id"): psutil.Process(n.process.pid) for n in nodes}  # type: ignore[union-attr]
    before = {node_id: p.memory_info().rss for node_id, p in pids.items()}
    instance = place(nodes[0], MODEL, 3)
    grown = [pids[s["node_id"]].memory_info().rss - before[s["node_id"]] for s in instance["stages"]]
    layers = [s["layers"][1] - s["layers"][0] for s in instance["stages"]]
    total = sum(grown)
    print("stage growth: " + ", ".join(f"{n} layers +{g / 2**20:.0f} MiB" for n, g in zip(layers, grown)))
    assert layers == [12, 12, 6]  # the work of a token split evenly: the last stage also runs the head (6 blocks' time)
    # 12 blocks and the embedding, 12 blocks, 6 blocks and the (tied) head (each of those a vocabulary
    # matrix, with the weights of 8 blocks), plus each process's torch runtime: no stage holds more
    # than about half of what the three hold together, and none holds nearly nothing.
    for value in grown:
        assert 0.1 * total < value < 0.6 * total, grown
