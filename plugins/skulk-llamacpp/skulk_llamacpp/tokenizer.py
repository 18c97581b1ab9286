"""The model's own tokenizer, read from the GGUF through llama.cpp's vocabulary API.

Token pieces, control tokens and end-of-generation tokens are read once at load, so the per-token
calls the core makes while streaming (``token_bytes``, ``is_control``) never touch native memory;
only :meth:`LlamaCppTokenizer.encode` calls into llama.cpp.
"""

from __future__ import annotations

import ctypes

import llama_cpp

from skulk_core import RequestError

from skulk_llamacpp.native import LoadedModel


class LlamaCppTokenizer:
    """Satisfies :class:`skulk_core.Tokenizer` for a model loaded by llama.cpp."""

    def __init__(self, model: LoadedModel) -> None:
        self._model = model
        vocab = model.vocab
        self.vocab_size: int = model.n_vocab
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        self.bos_token_id: int | None = None if bos < 0 else bos
        self._pieces = tuple(_piece(vocab, token) for token in range(self.vocab_size))
        self.eos_token_ids: frozenset[int] = frozenset(
            token for token in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, token)
        )
        self._control = frozenset(
            token for token in range(self.vocab_size) if llama_cpp.llama_vocab_is_control(vocab, token)
        ) | self.eos_token_ids

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Tokens for ``text``. ``add_special`` adds BOS only where the model's GGUF asks for it."""
        self._model.check_alive()
        data = text.encode("utf-8")
        capacity = len(data) + 8  # a token holds at least one byte, plus BOS/EOS
        while True:
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self._model.vocab, data, len(data), buffer, capacity, add_special, parse_special)
            if count >= 0:
                return list(buffer[:count])
            if -count <= capacity:  # llama.cpp reports an overflow as the negated size it needs
                raise RequestError(f"llama.cpp could not tokenize the text (status {count})", param="input")
            capacity = -count

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes; special tokens are rendered (``<|im_end|>``) so they can be seen."""
        return self._pieces[self._check(token_id)]

    def is_control(self, token_id: int) -> bool:
        """True for control and end-of-generation tokens, which are never shown as text."""
        return self._check(token_id) in self._control

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise RequestError(f"token id {token_id} is outside the vocabulary (0 to {self.vocab_size - 1})", param="tokens")
        return token_id


def _piece(vocab: object, token: int) -> bytes:
    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        count = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        if count >= 0:
            return buffer.raw[:count]
        size = -count
