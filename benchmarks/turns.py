"""Chat turns benchmark: how soon the next turn of a conversation starts, skulk against
llama-cpp-python's own OpenAI server.

A chat client sends the whole conversation again with every turn, so a server that recomputes it
all takes longer at every turn. One run starts, on the same model (the default GGUF) and threads:

- skulk: a real ``skulk run`` process (llamacpp backend, openai frontend), which keeps finished
  requests' caches and starts a prompt after the part a kept cache holds (``llamacpp.prompt_cache``);
- skulk without it (``SKULK_LLAMACPP_PROMPT_CACHE=false``): what every turn costs recomputed;
- the peer: ``python -m llama_cpp.server`` on the same GGUF and threads, which keeps its last
  prompt's cache and reuses what the next prompt shares with it.

``--users`` conversations take turns, interleaved (user 0's turn, user 1's, ...), ``--turns``
each, every answer ``--answer-tokens`` long (temperature 0). Then each user's next turn is timed to
its first token (a one-token answer, not streamed): the median over users and ``--runs`` rounds,
printed as skulk against the peer and against skulk without its cache.

    .venv/bin/python benchmarks/turns.py [--users 4] [--turns 5] [--runs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import MODEL_ID, PeerServer, SkulkServer, parser_with, run_and_report  # noqa: E402

MESSAGE = "Tell me more about the old harbour town, its markets, its boats and the people who live there. " * 3


def chat(url: str, messages: Sequence[dict[str, str]], max_tokens: int) -> tuple[float, dict[str, Any]]:
    """(seconds, reply) of one plain chat completion at temperature 0."""
    body = {"model": MODEL_ID, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.load(response)
    return time.perf_counter() - start, reply


def next_turns(url: str, users: int, turns: int, answer_tokens: int, tag: str) -> tuple[list[float], list[int], list[int]]:
    """Hold ``users`` interleaved conversations of ``turns`` turns, then time each one's next turn
    to its first token: (seconds, prompt tokens, cached tokens) per user."""
    chats: list[list[dict[str, str]]] = [[] for _ in range(users)]
    for turn in range(turns):
        for user, messages in enumerate(chats):
            messages.append({"role": "user", "content": f"{tag} user {user}, turn {turn}. {MESSAGE}"})
            _, reply = chat(url, messages, answer_tokens)
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"] or ""})
    seconds, prompts, cached = [], [], []
    for messages in chats:
        took, reply = chat(url, [*messages, {"role": "user", "content": "Thank you. One more thing?"}], 1)
        seconds.append(took)
        usage = reply["usage"]
        prompts.append(usage["prompt_tokens"])
        cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return seconds, prompts, cached


def run(args: argparse.Namespace) -> dict[str, Any]:
    from skulk_core import default_model_path

    workdir = Path(tempfile.mkdtemp(prefix="skulk-turns-"))
    sequences = max(8, args.users)
    servers: list[Any] = [
        SkulkServer(workdir, args.threads, args.context, sequences),
        SkulkServer(workdir, args.threads, args.context, sequences, name="skulk-no-cache", extra_env={"SKULK_LLAMACPP_PROMPT_CACHE": "false"}),
        PeerServer(workdir, default_model_path(), args.threads, args.context),
    ]
    seconds: dict[str, list[float]] = {server.name: [] for server in servers}
    prompts: dict[str, list[int]] = {server.name: [] for server in servers}
    cached: dict[str, list[int]] = {server.name: [] for server in servers}
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout=120)
        for round_index in range(args.runs):
            order = servers if round_index % 2 == 0 else servers[::-1]
            for server in order:
                if not args.json:
                    print(f"round {round_index + 1}/{args.runs}: {server.name}", file=sys.stderr)
                took, tokens, reused = next_turns(server.url, args.users, args.turns, args.answer_tokens, f"Round {round_index}")
                seconds[server.name] += took
                prompts[server.name] += tokens
                cached[server.name] += reused
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "settings": {"threads": args.threads, "users": args.users, "turns": args.turns, "answer_tokens": args.answer_tokens, "runs": args.runs},
        "next_turn_first_token_s": {name: round(value, 3) for name, value in medians.items()},
        "ranges": {name: [round(min(v), 3), round(max(v), 3)] for name, v in seconds.items()},
        "prompt_tokens": {name: statistics.median(v) for name, v in prompts.items()},
        "cached_tokens": {name: statistics.median(v) for name, v in cached.items()},
        "skulk_vs_peer": round(medians["skulk"] / medians["peer"], 3),
        "skulk_vs_no_cache": round(medians["skulk"] / medians["skulk-no-cache"], 3),
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(
        f"the next turn of {s['users']} interleaved chats after {s['turns']} turns each ({s['answer_tokens']}-token answers), "
        f"{MODEL_ID}, {s['threads']} threads, {s['runs']} rounds"
    )
    print(f"{'':16}{'first token, s (median, range)':>34}{'prompt tokens':>15}{'cached tokens':>15}")
    for name, value in report["next_turn_first_token_s"].items():
        low, high = report["ranges"][name]
        print(f"{name:16}{value:>20.3f} ({low:.3f}-{high:.3f}){report['prompt_tokens'][name]:>15}{report['cached_tokens'][name]:>15}")
    print(f"skulk's next turn starts in {report['skulk_vs_peer']:.2f}x the peer's time, {report['skulk_vs_no_cache']:.2f}x its own without prompt_cache")


def main(argv: Sequence[str] | None = None) -> int:
    options = [
        ("--users", dict(type=int, default=4, help="conversations, interleaved (default 4)")),
        ("--turns", dict(type=int, default=5, help="turns each before the timed one (default 5)")),
        ("--answer-tokens", dict(type=int, default=16, help="tokens of each answer (default 16)")),
        ("--runs", dict(type=int, default=2, help="rounds (default 2)")),
    ]
    parser = parser_with(__doc__.split("\n\n")[0], options)
    args = parser.parse_args(argv)
    if min(args.users, args.turns, args.answer_tokens, args.runs, args.threads) < 1:
        parser.error("every count must be at least 1")
    return run_and_report(args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
