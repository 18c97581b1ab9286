"""The first stage's tokenizer, built from the model's own files.

Three routes, chosen by :func:`load_tokenizer`:

- A GGUF with llama-cpp-python installed: llama.cpp loads the file's vocabulary only (no weights,
  about 0.1 s) and tokenizes exactly as llama.cpp does: every pre-tokenizer and vocabulary type it
  knows, the same special-token handling.
- A GGUF without llama-cpp-python: a ``tokenizers`` BPE built from the GGUF's tokens and merges,
  for byte-level BPE vocabularies (``tokenizer.ggml.model`` ``gpt2``) with a pre-tokenizer named
  in :data:`PRE_TOKENIZERS` (SmolLM's, Llama 3's, Qwen2's, GPT-2's, llama.cpp's default). Others
  need llama.cpp.
- A safetensors directory: its ``tokenizer.json`` through ``tokenizers``.

Token pieces, control tokens and end-of-generation tokens are computed once at load, so the
per-token calls the core makes while streaming never go back into a native library.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from skulk_core import BackendError, ModelError, RequestError

from skulk_torch.gguf_file import GGUFFile

log = logging.getLogger("skulk.torch")

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# Token texts llama.cpp treats as end of generation whatever the metadata says (llama-vocab.cpp:
# end-of-turn texts, and the fill-in-the-middle repository and file separators).
_END_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "</s>",
        "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
    }
)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (the split expressions llama.cpp's llama-vocab.cpp applies one after the
# other, ignore_merges: a word already in the vocabulary is one token)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((_GPT2_SPLIT,), False),
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"), False),
    "smollm": ((r"\p{N}", _GPT2_SPLIT), False),
    "starcoder": ((r"\p{N}", _GPT2_SPLIT), False),
    "refact": ((r"\p{N}", _GPT2_SPLIT), False),
    "llama-bpe": ((_LLAMA3_SPLIT,), True),
    "llama3": ((_LLAMA3_SPLIT,), True),
    "qwen2": ((_QWEN2_SPLIT,), False),
}


class PieceTokenizer:
    """Satisfies :class:`skulk_core.Tokenizer`: pieces and flags precomputed, ``encode`` delegated."""

    route = "none"

    def __init__(
        self,
        pieces: list[bytes],
        control: frozenset[int],
        eos: frozenset[int],
        bos: int | None,
    ) -> None:
        self.vocab_size = len(pieces)
        self._pieces = tuple(pieces)
        self.eos_token_ids: frozenset[int] = eos
        self._control = control | eos
        self.bos_token_id: int | None = bos

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        raise NotImplementedError

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


# -- llama.cpp -----------------------------------------------------------------------------------


class LlamaCppVocabTokenizer(PieceTokenizer):
    """llama.cpp's tokenizer, from a vocabulary-only load of the GGUF (no weights are read)."""

    route = "llamacpp"

    def __init__(self, path: Path) -> None:
        import llama_cpp

        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with _routed_llama_logs(llama_cpp) as problems:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            said = f" (llama.cpp said: {'; '.join(problems)})" if problems else ""
            raise BackendError(f"llama.cpp could not read the vocabulary of {path}{said}")
        self._llama_cpp = llama_cpp
        self._model = model
        self._lock = threading.Lock()
        vocab = llama_cpp.llama_model_get_vocab(model)
        self._vocab = vocab
        n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab))
        eos = frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t))
        control = frozenset(t for t in range(n_vocab) if llama_cpp.llama_vocab_is_control(vocab, t))
        pieces = [_llama_piece(llama_cpp, vocab, t) for t in range(n_vocab)]
        super().__init__(pieces, control, eos, None if bos < 0 else bos)

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Tokens for ``text``. ``add_special`` adds BOS only where the model's GGUF asks for it."""
        llama_cpp = self._llama_cpp
        data = text.encode("utf-8")
        capacity = len(data) + 8  # a token holds at least one byte, plus BOS/EOS
        with self._lock:
            if self._model is None:
                raise BackendError("the tokenizer was closed")
            while True:
                buffer = (llama_cpp.llama_token * capacity)()
                count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
                if count >= 0:
                    return list(buffer[:count])
                if -count <= capacity:
                    raise RequestError(f"llama.cpp could not tokenize the text (status {count})", param="input")
                capacity = -count

    def close(self) -> None:
        with self._lock:
            if self._model is not None:
                self._llama_cpp.llama_model_free(self._model)
                self._model = None


def _llama_piece(llama_cpp: Any, vocab: object, token: int) -> bytes:
    size = 32
    while True:
        buffer = ctypes.create_string_buffer(size)
        count = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        if count >= 0:
            return buffer.raw[:count]
        size = -count


_LOG_WARN, _LOG_CONT = 3, 5  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_log_callback: Any = None  # must stay referenced while llama.cpp may call it
_log_problems: list[str] = []


def _on_log(level: int, text: bytes | None, _user_data: object) -> None:
    try:
        line = (text or b"").decode("utf-8", "replace").rstrip()
        if line:
            log.debug("llama.cpp: %s", line)
            if _LOG_WARN <= level < _LOG_CONT:
                _log_problems.append(line)
    except Exception:  # an exception must never cross back into C
        pass


@contextmanager
def _routed_llama_logs(llama_cpp: Any) -> Iterator[list[str]]:
    """Send llama.cpp's log lines to the ``skulk.torch`` logger while loading the vocabulary
    (llama-cpp-python prints them to stderr), then put back whatever callback was installed, so a
    callback another plugin set (the llamacpp backend's) keeps working."""
    global _log_callback
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(_on_log)
    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    can_restore = hasattr(llama_cpp, "llama_log_get")
    if can_restore:
        llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    _log_problems.clear()
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    try:
        yield _log_problems
    finally:
        if can_restore:
            llama_cpp.llama_log_set(previous, user_data)


# -- tokenizers ----------------------------------------------------------------------------------


class HFTokenizer(PieceTokenizer):
    """A ``tokenizers.Tokenizer`` with the pieces and flags the core needs."""

    route = "tokenizers"

    def __init__(
        self, tokenizer: Any, pieces: list[bytes], control: frozenset[int], eos: frozenset[int], bos: int | None, add_bos: bool
    ) -> None:
        super().__init__(pieces, control, eos, bos)
        self._tokenizer = tokenizer
        self._add_bos = add_bos and bos is not None
        self._lock = threading.Lock()  # encode_special_tokens is state on the shared tokenizer

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        with self._lock:
            self._tokenizer.encode_special_tokens = not parse_special
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if add_special and self._add_bos:
            ids = [self.bos_token_id, *ids]
        return ids


def gguf_bpe_tokenizer(gguf_file: GGUFFile) -> HFTokenizer:
    """A byte-level BPE tokenizer built from a GGUF's vocabulary (``tokenizer.ggml.model == gpt2``)."""
    model = gguf_file.get("tokenizer.ggml.model")
    pre = str(gguf_file.get("tokenizer.ggml.pre", "gpt-2"))
    name = gguf_file.path.name
    if model != "gpt2":
        raise BackendError(
            f"{name} has a {model!r} vocabulary; without llama-cpp-python the torch backend tokenizes byte-level "
            "BPE (gpt2) vocabularies only. Install llama-cpp-python to use llama.cpp's tokenizer"
        )
    if pre not in PRE_TOKENIZERS:
        raise BackendError(
            f"{name} uses the {pre!r} pre-tokenizer, which the tokenizers route does not know "
            f"(it knows {', '.join(sorted(PRE_TOKENIZERS))}); install llama-cpp-python to use llama.cpp's tokenizer"
        )
    try:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise BackendError("tokenizing this model needs llama-cpp-python or tokenizers; pip install tokenizers") from None

    tokens = [str(t) for t in gguf_file.array("tokenizer.ggml.tokens")]
    types = list(gguf_file.array("tokenizer.ggml.token_type")) if gguf_file.get("tokenizer.ggml.token_type") else [_NORMAL] * len(tokens)
    merges = [tuple(str(m).split(" ", 1)) for m in gguf_file.array("tokenizer.ggml.merges")]
    splits, ignore_merges = PRE_TOKENIZERS[pre]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    special = [i for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    decode = _byte_decoder()
    pieces = [
        tokens[i].encode("utf-8") if types[i] in (_CONTROL, _USER_DEFINED) else _byte_level_bytes(tokens[i], decode)
        for i in range(len(tokens))
    ]
    control = frozenset(i for i, kind in enumerate(types) if kind == _CONTROL)
    eos = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if gguf_file.get(key) is not None:
            eos.add(int(gguf_file.get(key)))
    eos |= {i for i in special if tokens[i] in _END_TEXTS}
    bos = gguf_file.get("tokenizer.ggml.bos_token_id")
    add_bos = bool(gguf_file.get("tokenizer.ggml.add_bos_token", False))
    return HFTokenizer(tokenizer, pieces, control, frozenset(eos), None if bos is None else int(bos), add_bos)


def hf_directory_tokenizer(path: Path) -> HFTokenizer:
    """The ``tokenizer.json`` of a Hugging Face model directory."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ModelError(f"{path} has no tokenizer.json; the first stage of a safetensors model needs one")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise BackendError("reading tokenizer.json needs the tokenizers package; pip install tokenizers") from None
    tokenizer = Tokenizer.from_file(str(file))
    spec = json.loads(file.read_text(encoding="utf-8"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    texts = [""] * size
    for text, index in vocab.items():
        texts[index] = text
    added = {item["id"]: item for item in spec.get("added_tokens", [])}
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
    decode = _byte_decoder()
    pieces = [
        texts[i].encode("utf-8") if i in added else (_byte_level_bytes(texts[i], decode) if byte_level else _sentencepiece_bytes(texts[i]))
        for i in range(size)
    ]
    control = frozenset(i for i, item in added.items() if item.get("special"))
    config = _json_or_empty(path / "config.json") | _json_or_empty(path / "generation_config.json")
    eos_value = config.get("eos_token_id")
    eos = {int(e) for e in (eos_value if isinstance(eos_value, list) else [eos_value]) if e is not None}
    eos |= {i for i in control if texts[i] in _END_TEXTS}
    bos = config.get("bos_token_id")
    add_bos = bool(_json_or_empty(path / "tokenizer_config.json").get("add_bos_token", False))
    return HFTokenizer(tokenizer, pieces, control, frozenset(eos), None if bos is None else int(bos), add_bos)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _byte_level_bytes(text: str, decode: dict[str, int]) -> bytes:
    try:
        return bytes(decode[c] for c in text)
    except KeyError:
        return text.encode("utf-8")


def _sentencepiece_bytes(text: str) -> bytes:
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        return bytes([int(text[3:5], 16)])
    return text.replace("\u2581", " ").encode("utf-8")


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# -- choosing ------------------------------------------------------------------------------------


def load_tokenizer(path: Path, route: str = "auto") -> PieceTokenizer:
    """The tokenizer for the model at ``path`` (a GGUF file or a safetensors directory)."""
    if path.is_dir():
        return hf_directory_tokenizer(path)
    if route in ("auto", "llamacpp"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            if route == "llamacpp":
                raise BackendError("torch.tokenizer is llamacpp but llama-cpp-python is not installed") from None
        else:
            return LlamaCppVocabTokenizer(path)
    with GGUFFile(path) as gguf_file:
        return gguf_bpe_tokenizer(gguf_file)
