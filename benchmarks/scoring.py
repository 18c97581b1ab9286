"""Prompt scoring benchmark: skulk against llama-cpp-python's own OpenAI server and raw llama.cpp.

Scoring a prompt (``/v1/completions`` with ``echo`` and ``logprobs``: each prompt token's
log-probability after the ones before it) is what evaluation harnesses ask a server for. One run
measures, on the same model (the default GGUF), the same prompt and the same thread count:

- skulk: a real ``skulk run`` process (llamacpp backend, openai frontend, standalone, loopback);
- the peer: ``python -m llama_cpp.server`` on the same GGUF and threads, with ``--logits_all True``
  (without it the peer refuses ``echo`` with ``logprobs``);
- raw: in this process, the prompt decoded with llama.cpp's logits kept at every position and each
  row's log-softmax taken with numpy: the most a server could get out of llama.cpp here.

Each round times one request per server (and raw), interleaved. Besides the time, every server's
log-probabilities are compared with raw's, position by position: a server that scores the wrong
position shows it there. Then a multiple-choice question, as evaluation harnesses score one: the
same long context followed by each of four answers, one request each; raw computes the context once.

    .venv/bin/python benchmarks/scoring.py [--threads 2] [--repeat 40] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import MODEL_ID, PeerServer, RawEngine, SkulkServer, parser_with, run_and_report  # noqa: E402

TEXT = "The history of the city goes back many centuries, to a small village by the river. "
# A multiple-choice question's answers, each scored after the same context (lm-evaluation-harness's
# way: one request per answer, the context repeated in each).
ANSWERS = (" By the river.", " On a hill.", " In a forest.", " Near the sea.")
# Log-probabilities this close to raw's count as the same: llama.cpp's matrix kernels depend on how
# a step is split into micro-batches, and the same position scores up to 0.21 apart between a
# 64-row slice and rows one at a time. A score read from the wrong position is off by nats.
AGREE = 0.25


def score_request(url: str, text: str, timeout: float = 900.0) -> tuple[float, dict[str, Any]]:
    """(seconds, the choice's logprobs) of one scoring request: echo, logprobs 1, one token generated."""
    body = {"model": MODEL_ID, "prompt": text, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.load(response)
    return time.perf_counter() - start, reply["choices"][0]["logprobs"]


def token_prompt_status(url: str) -> int:
    """The HTTP status a scoring request with a token-id prompt gets (lm-evaluation-harness sends those)."""
    body = {"model": MODEL_ID, "prompt": [[504, 3575, 282, 4649, 314]], "max_tokens": 1, "echo": True, "logprobs": 1}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def raw_tokens(raw: RawEngine, text: str) -> list[int]:
    """``text``'s tokens as the servers get them (the BOS added, special tokens parsed)."""
    lc = raw.llama_cpp
    data = text.encode()
    out = (lc.llama_token * (len(data) + 8))()
    return list(out[: lc.llama_tokenize(raw.vocab, data, len(data), out, len(out), True, True)])


def raw_scores(raw: RawEngine, text: str, slice_rows: int = 64) -> tuple[float, list[int], list[float]]:
    """(seconds, prompt tokens, each token's log-probability after the ones before it) from raw
    llama.cpp: the prompt decoded ``slice_rows`` positions a call, every row's logits kept."""
    import numpy as np

    from skulk_core.sampling import log_softmax

    lc = raw.llama_cpp
    tokens = raw_tokens(raw, text)
    lc.llama_memory_clear(raw.memory, True)
    start = time.perf_counter()
    scores: list[float] = []
    for first in range(0, len(tokens), slice_rows):
        part = tokens[first : first + slice_rows]
        raw._decode([(t, first + i, 0, True) for i, t in enumerate(part)])
        for i in range(len(part)):
            position = first + i
            if position + 1 < len(tokens):
                row = np.ctypeslib.as_array(lc.llama_get_logits_ith(raw.ctx, i), shape=(raw.n_vocab,))
                scores.append(float(log_softmax(row)[tokens[position + 1]]))
    return time.perf_counter() - start, tokens, scores


def raw_choices(raw: RawEngine, context: str, answers: Sequence[str], slice_rows: int = 64) -> float:
    """Seconds raw llama.cpp takes to score ``context`` followed by each of ``answers`` when it
    computes the context once: the context's positions (every row's logits kept, each row's
    log-softmax), then for each answer the cache cut back to the context and the answer's positions
    scored after it. What a server that scores a multiple-choice question could at best do."""
    import numpy as np

    from skulk_core.sampling import log_softmax

    from skulk_core import shared_prefix

    lc = raw.llama_cpp
    prompts = [raw_tokens(raw, context + answer) for answer in answers]
    shared = min(shared_prefix(prompts[0], p) for p in prompts[1:])
    lc.llama_memory_clear(raw.memory, True)
    start = time.perf_counter()

    def score(tokens: list[int], first: int, end: int) -> None:
        for low in range(first, end, slice_rows):
            part = tokens[low : min(end, low + slice_rows)]
            raw._decode([(t, low + i, 0, True) for i, t in enumerate(part)])
            for i in range(len(part)):
                if low + i + 1 < len(tokens):
                    row = np.ctypeslib.as_array(lc.llama_get_logits_ith(raw.ctx, i), shape=(raw.n_vocab,))
                    float(log_softmax(row)[tokens[low + i + 1]])

    score(prompts[0], 0, shared - 1)  # the shared part's last row scores each answer's own first
    for tokens in prompts:  # token, so it is computed with each answer
        lc.llama_memory_seq_rm(raw.memory, 0, shared - 1, -1)
        score(tokens, shared - 1, len(tokens))
    return time.perf_counter() - start


def compare(reference: Sequence[float], logprobs: dict[str, Any]) -> dict[str, Any]:
    """How a server's prompt log-probabilities (after its first, null entry) match raw's."""
    served = logprobs["token_logprobs"][1 : len(reference) + 1]
    if len(served) != len(reference) or any(v is None for v in served):
        return {"positions": len(served), "max_abs_diff": None, "agree": False}
    diff = max(abs(a - b) for a, b in zip(served, reference))
    close = sum(abs(a - b) <= AGREE for a, b in zip(served, reference))
    return {"positions": len(served), "max_abs_diff": round(diff, 4), "within": close, "agree": diff <= AGREE}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from skulk_core import default_model_path

    model = default_model_path()
    workdir = Path(tempfile.mkdtemp(prefix="skulk-scoring-"))
    # Each round's prompt is its own from its first words: no server may answer it from an earlier
    # round's scores (skulk keeps those of recent scored prompts, for prompts that begin alike).
    texts = [f"Volume {index + 1}. " + TEXT * args.repeat for index in range(args.runs)]
    skulk = SkulkServer(workdir, args.threads, args.context, 8)
    peer = PeerServer(workdir, model, args.threads, args.context, extra=("--logits_all", "True"))
    servers = [skulk, peer]
    raw: RawEngine | None = None
    times: dict[str, list[float]] = {"skulk": [], "peer": [], "raw": []}
    checks: dict[str, dict[str, Any]] = {}
    try:
        for server in servers:
            server.start()
        raw = RawEngine(model, args.threads, args.context, 1)
        for server in servers:
            server.wait_ready(timeout=120)
        for server in servers:  # warm up, on a short prompt
            score_request(server.url, TEXT)
        raw_scores(raw, TEXT)
        prompt_tokens = 0
        for round_index in range(args.runs):
            if not args.json:
                print(f"round {round_index + 1}/{args.runs}", file=sys.stderr)
            text = texts[round_index]
            seconds, tokens, reference = raw_scores(raw, text)
            times["raw"].append(seconds)
            prompt_tokens = len(tokens)
            for server in servers if round_index % 2 == 0 else servers[::-1]:
                seconds, logprobs = score_request(server.url, text)
                times[server.name].append(seconds)
                checks[server.name] = compare(reference, logprobs)
        choice_times: dict[str, list[float]] = {"skulk": [], "peer": [], "raw": []}
        for round_index in range(args.runs):
            if not args.json:
                print(f"multiple choice, round {round_index + 1}/{args.runs}", file=sys.stderr)
            context = f"Question {round_index + 1}. " + TEXT * args.repeat + "Where was the village?"
            choice_times["raw"].append(raw_choices(raw, context, ANSWERS))
            for server in servers if round_index % 2 == 0 else servers[::-1]:
                choice_times[server.name].append(sum(score_request(server.url, context + answer)[0] for answer in ANSWERS))
        token_prompts = {server.name: token_prompt_status(server.url) for server in servers}
    finally:
        for server in servers:
            server.stop()
        if raw is not None:
            raw.close()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "settings": {"threads": args.threads, "prompt_tokens": prompt_tokens, "runs": args.runs, "context_length": args.context},
        "seconds": {name: round(value, 3) for name, value in medians.items()},
        "ranges": {name: [round(min(v), 3), round(max(v), 3)] for name, v in times.items()},
        "tokens_per_s": {name: round(prompt_tokens / value, 1) for name, value in medians.items()},
        "skulk_speedup_vs_peer": round(medians["peer"] / medians["skulk"], 2),
        "skulk_vs_raw": round(medians["raw"] / medians["skulk"], 2),
        "agreement_with_raw": checks,
        "choices": {
            "answers": len(ANSWERS),
            "seconds": {name: round(statistics.median(v), 3) for name, v in choice_times.items()},
            "ranges": {name: [round(min(v), 3), round(max(v), 3)] for name, v in choice_times.items()},
            "skulk_speedup_vs_peer": round(statistics.median(choice_times["peer"]) / statistics.median(choice_times["skulk"]), 2),
            "skulk_vs_raw": round(statistics.median(choice_times["raw"]) / statistics.median(choice_times["skulk"]), 2),
        },
        "token_id_prompt_status": token_prompts,
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"prompt scoring (echo + logprobs 1): {MODEL_ID}, {s['threads']} threads, a {s['prompt_tokens']}-token prompt, {s['runs']} rounds")
    print(f"{'':8}{'seconds (median, range)':>30}{'scored tokens/s':>18}{'max |logprob - raw|':>22}")
    for name in ("skulk", "peer", "raw"):
        low, high = report["ranges"][name]
        check = report["agreement_with_raw"].get(name)
        diff = "-" if check is None else ("no scores" if check["max_abs_diff"] is None else f"{check['max_abs_diff']:.3f}")
        print(f"{name:8}{report['seconds'][name]:>14.2f} ({low:.2f}-{high:.2f}){'':>2}{report['tokens_per_s'][name]:>18}{diff:>22}")
    print(f"skulk scores {report['skulk_speedup_vs_peer']:.2f}x as fast as the peer, at {report['skulk_vs_raw']:.2f}x raw's speed")
    for name in ("skulk", "peer"):
        check = report["agreement_with_raw"][name]
        verdict = "agrees with raw" if check["agree"] else "does NOT agree with raw"
        within = f"{check.get('within', 0)} of {check['positions']} positions within {AGREE}"
        print(f"{name}: {verdict} ({within})")
    choices = report["choices"]
    times = ", ".join(f"{name} {choices['seconds'][name]:.2f} s" for name in ("skulk", "peer", "raw"))
    print(
        f"a question scored with each of {choices['answers']} answers (one request each): {times}; skulk "
        f"{choices['skulk_speedup_vs_peer']:.2f}x as fast as the peer, at {choices['skulk_vs_raw']:.2f}x raw's speed "
        "(raw computes the question once)"
    )
    statuses = report["token_id_prompt_status"]
    print("a token-id prompt (as lm-evaluation-harness sends): " + ", ".join(f"{name} HTTP {code}" for name, code in statuses.items()))


def main(argv: Sequence[str] | None = None) -> int:
    options = [
        ("--repeat", dict(type=int, default=40, help="times the sentence is repeated in the prompt (default 40: 725 tokens)")),
        ("--runs", dict(type=int, default=3, help="rounds (default 3)")),
    ]
    parser = parser_with(__doc__.split("\n\n")[0], options)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeat < 1 or args.threads < 1:
        parser.error("--runs, --repeat and --threads must be at least 1")
    return run_and_report(args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
