"""The process-wide side of llama.cpp: one-time initialisation, log routing, and a loaded model.

Imported only when a backend loads a model (it imports ``llama_cpp``, which loads the shared
libraries). llama.cpp writes its logs to stderr unless told otherwise; they go to the Python logger
``skulk.llamacpp`` at debug level instead, and the latest warnings and errors are kept so a failed
load or decode can say why.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections import deque
from pathlib import Path

import llama_cpp

from skulk_core import BackendError, ModelError

from skulk_llamacpp.settings import LlamaCppSettings

log = logging.getLogger("skulk.llamacpp")

# ggml_log_level as this llama.cpp defines it: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_LOG_WARN = 3
_LOG_CONT = 5

_init_lock = threading.Lock()
_initialised = False
_log_callback = None  # the ctypes callback must stay referenced for as long as llama.cpp may call it
_recent_problems: deque[str] = deque(maxlen=8)
_line_buffer: list[str] = []
_last_level = 0


def _on_log(level: int, text: bytes | None, _user_data: object) -> None:
    global _last_level
    try:
        if level != _LOG_CONT:
            _last_level = level
        _line_buffer.append((text or b"").decode("utf-8", "replace"))
        if not _line_buffer[-1].endswith("\n"):
            return  # llama.cpp writes some lines in pieces
        line = "".join(_line_buffer).rstrip()
        _line_buffer.clear()
        if not line:
            return
        if _last_level >= _LOG_WARN:
            _recent_problems.append(line)
        log.debug("%s", line)
    except Exception:  # an exception must never cross back into C
        pass


def ensure_initialised() -> None:
    """Route llama.cpp's logs to Python logging and initialise its backend, once per process."""
    global _initialised, _log_callback
    with _init_lock:
        if _initialised:
            return
        _log_callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


@functools.cache
def amx_kernels_built() -> bool:
    """Whether this llama.cpp was built with ggml's AMX kernels (``-march=native`` on a CPU with
    AMX, such as a Xeon of 2023 or later).

    In the llama.cpp that llama-cpp-python 0.3.36 carries, those kernels crash the process at a
    model's first matrix product of a prompt (a general protection fault in
    ``ggml_backend_amx_mul_mat``: the tile configuration is kept on the stack, where the compiler
    optimises it away; llama.cpp issue 20824, pull request 26954). A model that llama.cpp would
    put in an AMX buffer is loaded without llama.cpp's extra buffer types instead (see
    :class:`LoadedModel`); the repository's ``make install`` builds llama.cpp without them."""
    library = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    try:
        has_amx = ctypes.CDLL(str(library)).ggml_cpu_has_amx_int8
    except (OSError, AttributeError):  # another layout (macOS names it .dylib; no Mac has AMX)
        return False
    has_amx.restype = ctypes.c_int
    return bool(has_amx())


def take_problems() -> str:
    """The warnings and errors llama.cpp logged since the last call, for an error message."""
    problems = "; ".join(_recent_problems)
    _recent_problems.clear()
    return problems


def with_problems(message: str) -> str:
    problems = take_problems()
    return f"{message} (llama.cpp said: {problems})" if problems else message


class LoadedModel:
    """A ``llama_model`` and its vocabulary; :meth:`free` releases it (idempotent)."""

    def __init__(self, path: Path, settings: LlamaCppSettings, *, vocab_only: bool = False) -> None:
        ensure_initialised()
        if not path.is_file():
            raise ModelError(f"no GGUF file at {path}")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0  # this backend declares the CPU only
        params.vocab_only = vocab_only  # the tokenizer alone: no weights are read
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if settings.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        if not vocab_only and amx_kernels_built():
            # Without extra buffer types the weights stay in plain CPU buffers, out of the AMX
            # kernels' reach (amx_kernels_built), at the cost of llama.cpp's repacked layouts.
            params.use_extra_bufts = False
            log.warning(
                "this llama.cpp was built with ggml's AMX kernels, which crash in llama-cpp-python 0.3.36; "
                "%s is loaded without llama.cpp's extra buffer types. Rebuild llama-cpp-python without them: "
                "CMAKE_ARGS='-DGGML_RPC=on -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8' "
                "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36",
                path.name,
            )
        take_problems()
        ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise BackendError(with_problems(f"llama.cpp could not load {path}; is it a GGUF file of an architecture this llama.cpp knows?"))
        self.path = path
        self.ptr: int | None = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(ptr))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(ptr))

    @property
    def alive(self) -> bool:
        return self.ptr is not None

    def check_alive(self) -> None:
        if self.ptr is None:
            raise BackendError(f"the llama.cpp model {self.path.name} was closed; load it again")

    def free(self) -> None:
        if self.ptr is not None:
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None
            self.vocab = None
