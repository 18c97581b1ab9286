"""A fake backend for the frontend's fast tests: deterministic logits from a tiny byte tokenizer.

Named as a fake: it stands for a real model where the tests check the HTTP protocol, not language.
Loaded with ``--plugin path/to/openai_fake_backend.py`` and ``serve.backend: fake`` on a GGUF written by
:func:`write_fake_gguf` (the builtin storage plugin reads its card like any model's).

The "model": tokens 0-255 are bytes; 256-259 are ``<|im_start|>``, ``<|im_end|>`` (end of turn),
``<|endoftext|>`` and ``<s>`` (BOS, added only when ``add_special``). After a lowercase letter the
most likely next token is the next letter, after ``z`` the end of turn; after anything else ``a``.
So greedy decoding answers ``abcdefghijklmnopqrstuvwxyz`` and stops, whatever the prompt. Every
other token gets a logit drawn from a generator seeded by the last token, so sampling at a
temperature gives varied (but seed-reproducible) bytes. Embeddings are a normalised histogram.

Settings (config section ``fake``): ``step_delay`` (seconds each step sleeps, so a stream lasts
long enough to be interrupted) and ``load_delay`` (seconds ``load`` takes, to observe "loading").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import numpy as np
from attrs import field, frozen

from skulk_core import BackendCapabilities, EngineOptions, ModelCard, ModelFiles, SequenceChunk, ShardRange, StageOutput, hookimpl, score_token

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>")
IM_START, IM_END, ENDOFTEXT, BOS = 256, 257, 258, 259
VOCAB = 260
PEAK = 8.0
EMBEDDING_SIZE = 16
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_fake_gguf(path: Path, *, context_length: int = 4096) -> Path:
    """A GGUF holding only what a card needs: architecture, sizes, vocabulary, template."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "fake")
    writer.add_name("Fake Tiny")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_context_length(context_length)
    writer.add_tokenizer_model("fake")
    writer.add_token_list([bytes([i]).hex() for i in range(256)] + list(SPECIALS))
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(IM_END)
    writer.add_chat_template(TEMPLATE)
    writer.add_tensor("token_embd.weight", np.zeros((VOCAB, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class FakeTokenizer:
    bos_token_id = BOS
    eos_token_ids = frozenset({IM_END, ENDOFTEXT})
    vocab_size = VOCAB

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        out = [BOS] if add_special else []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in SPECIALS if parse_special and s in rest]
            if not hits:
                out += list(rest.encode())
                break
            index, special = min(hits)
            out += list(rest[:index].encode())
            out.append(256 + SPECIALS.index(special))
            rest = rest[index + len(special) :]
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else SPECIALS[token_id - 256].encode()

    def is_control(self, token_id: int) -> bool:
        return token_id >= 256


def fake_logits(last_token: int) -> np.ndarray:
    logits = np.random.default_rng(last_token).normal(0.0, 1.0, VOCAB).astype(np.float32)
    if ord("a") <= last_token < ord("z"):
        peak = last_token + 1
    elif last_token == ord("z"):
        peak = IM_END
    else:
        peak = ord("a")
    logits[peak] += PEAK
    return logits


class FakeEngine:
    def __init__(self, card: ModelCard, shard: ShardRange, options: EngineOptions, step_delay: float) -> None:
        self.shard = shard
        self.context_length = options.context_length
        self.max_sequences = options.max_sequences
        self.tokenizer = FakeTokenizer()
        self.step_delay = step_delay
        self.live: set[str] = set()  # request ids holding (fake) KV cache
        self.released: list[str] = []

    async def step(self, batch: Sequence[SequenceChunk]) -> list[StageOutput]:
        await anyio.sleep(self.step_delay)
        outputs = []
        for chunk in batch:
            assert chunk.tokens is not None
            if chunk.position + chunk.length > self.context_length:
                raise AssertionError(f"{chunk.request_id} overran the context")
            self.live.add(chunk.request_id)
            logits = fake_logits(chunk.tokens[-1]) if chunk.want_logits else None
            scores = [score_token(fake_logits(token), target, chunk.score_top) for token, target in zip(chunk.tokens, chunk.score_targets)]
            outputs.append(StageOutput(chunk.request_id, logits=logits, scores=scores))
        return outputs

    async def release(self, request_id: str) -> None:
        self.live.discard(request_id)
        self.released.append(request_id)

    async def close(self) -> None:
        self.live.clear()

    async def embed(self, tokens: Sequence[int]) -> list[float]:
        vector = np.zeros(EMBEDDING_SIZE, dtype=np.float64)
        for position, token in enumerate(tokens):
            vector[token % EMBEDDING_SIZE] += 1.0 + position / 100
        return (vector / np.linalg.norm(vector)).tolist()


@frozen
class FakeSettings:
    step_delay: float = field(default=0.002)
    load_delay: float = field(default=0.0)


class FakeBackend:
    name = "fake"
    capabilities = BackendCapabilities(formats={"gguf"}, layer_ranges=False, devices=("cpu",), batching=True, embeddings=True)

    def supports(self, card: ModelCard) -> str | None:
        return None if card.architecture == "fake" else f"the fake backend runs only fake models, not {card.architecture}"

    def estimate_memory(self, card: ModelCard, shard: ShardRange, options: EngineOptions) -> int:
        return 1 << 20

    async def load(self, card: ModelCard, files: ModelFiles, shard: ShardRange, options: EngineOptions) -> FakeEngine:
        settings = options.settings if isinstance(options.settings, FakeSettings) else FakeSettings()
        await anyio.sleep(settings.load_delay)
        return FakeEngine(card, shard, options, settings.step_delay)


@hookimpl
def skulk_register_backends(registry) -> None:  # type: ignore[no-untyped-def]
    registry.add("fake", FakeBackend)


@hookimpl
def skulk_config_sections(registry) -> None:  # type: ignore[no-untyped-def]
    registry.add("fake", FakeSettings)
