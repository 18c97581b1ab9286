"""Measure the torch backend on the default model: load time, decode speed, resident memory.

Each measurement runs in a fresh process, so imports, page cache and allocator state are those of a
node loading the model. Run from the repository root with the project's venv:

    .venv/bin/python plugins/skulk-torch/benchmarks/measure.py [--threads 2 1] [--tokens 64]

It prints one line per measurement and a JSON summary at the end. The machine's load average is
printed beside each number: on a shared 2-core machine another busy process halves a 2-thread
decode, so compare numbers taken at a low load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
started = time.perf_counter()
import anyio, numpy as np, psutil
from skulk_core import EngineOptions, ModelCard, ModelFiles, SequenceChunk, ShardRange, default_model_path
from skulk_torch import TorchBackend
args = json.loads(sys.argv[1])
card = ModelCard.from_gguf(default_model_path())
files = ModelFiles(card.id, "gguf", default_model_path())
shard = ShardRange(args["start"], args["end"], card.n_layers)
options = EngineOptions(context_length=args["context"], max_sequences=4, threads=args["threads"], settings={"dtype": args["dtype"]})
t0 = time.perf_counter()
import torch  # timed apart from the load: a node imports it once
t1 = time.perf_counter()
engine = anyio.run(TorchBackend().load, card, files, shard, options)
t2 = time.perf_counter()
result = {"import_torch_s": t1 - t0, "load_s": t2 - t1, "process_to_ready_s": t2 - started,
          "rss_loaded": psutil.Process().memory_info().rss, "params": engine.parameter_bytes()}
if args["tokens"]:
    prompt = engine.tokenizer.encode("<|im_start|>user\nTell me a long story about a fox.<|im_end|>\n<|im_start|>assistant\n")
    async def run():
        (out,) = await engine.step([SequenceChunk("r", 0, prompt)])
        position, times = len(prompt), []
        for _ in range(args["tokens"]):
            token = int(np.argmax(out.logits))
            t = time.perf_counter()
            (out,) = await engine.step([SequenceChunk("r", position, (token,))])
            times.append(time.perf_counter() - t)
            position += 1
        return times
    times = anyio.run(run)
    warm = times[4:]
    result["decode_tok_s_mean"] = len(warm) / sum(warm)
    result["decode_tok_s_median"] = 1 / sorted(warm)[len(warm) // 2]
    result["rss_after_decode"] = psutil.Process().memory_info().rss
    anyio.run(engine.release, "r")
    long_prompt = (prompt * 20)[:256]
    async def prefill():
        t = time.perf_counter()
        await engine.step([SequenceChunk("p", 0, long_prompt)])
        elapsed = time.perf_counter() - t
        await engine.release("p")
        return elapsed
    anyio.run(prefill)
    result["prefill_256_tok_s"] = 256 / min(anyio.run(prefill) for _ in range(2))
    async def four():
        ids = ["s0", "s1", "s2", "s3"]
        outs = await engine.step([SequenceChunk(i, 0, prompt) for i in ids])
        position, steps = len(prompt), 0
        t = time.perf_counter()
        for _ in range(args["tokens"] // 2):
            outs = await engine.step([SequenceChunk(i, position, (int(np.argmax(o.logits)),)) for i, o in zip(ids, outs)])
            position += 1
            steps += 1
        elapsed = time.perf_counter() - t
        for i in ids:
            await engine.release(i)
        return 4 * steps / elapsed
    result["decode_4_sequences_tok_s"] = anyio.run(four)
print("RESULT " + json.dumps(result))
"""


def child(start: int, end: int, threads: int, tokens: int, context: int = 512, dtype: str = "auto") -> dict:
    load = os.getloadavg()[0]
    args = json.dumps({"start": start, "end": end, "threads": threads, "tokens": tokens, "context": context, "dtype": dtype})
    out = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, check=True, timeout=600)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["loadavg_before"] = load
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="torch.dtype setting: auto (float32 on a CPU), float16, bfloat16")
    parser.add_argument("--decode-only", action="store_true", help="skip the per-stage memory measurements")
    args = parser.parse_args()
    summary: dict[str, object] = {}
    for threads in args.threads:
        for rep in range(args.repeat):
            r = child(0, 30, threads, args.tokens, dtype=args.dtype)
            print(f"whole model, {args.dtype}, {threads} thread(s): import torch {r['import_torch_s']:.2f} s, load {r['load_s']:.2f} s, "
                  f"decode {r['decode_tok_s_mean']:.1f} tok/s (median step {r['decode_tok_s_median']:.1f}), "
                  f"4 sequences {r['decode_4_sequences_tok_s']:.1f} tok/s together, prefill {r['prefill_256_tok_s']:.0f} tok/s, "
                  f"RSS {r['rss_after_decode'] / 2**20:.0f} MiB (load avg {r['loadavg_before']:.2f})", flush=True)
            summary[f"whole_t{threads}_r{rep}"] = r
    if args.decode_only:
        print(json.dumps(summary, indent=1))
        return
    for start, end in ((0, 30), (0, 10), (10, 20), (20, 30)):
        r = child(start, end, 2, 0)
        print(f"stage [{start}, {end}): load {r['load_s']:.2f} s, RSS {r['rss_loaded'] / 2**20:.0f} MiB, "
              f"weights {sum(r['params'].values()) / 2**20:.0f} MiB {r['params']}", flush=True)
        summary[f"rss_{start}_{end}"] = r
    base = child(0, 1, 1, 0)  # one layer: the runtime, tokenizer and embedding without the blocks
    summary["rss_0_1"] = base
    print(f"stage [0, 1): RSS {base['rss_loaded'] / 2**20:.0f} MiB")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
