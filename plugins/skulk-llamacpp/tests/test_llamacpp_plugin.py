"""The llama.cpp plugin as Skulk sees it, without loading a model: entry point, config, estimates."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from skulk_core import (
    BackendError,
    ConfigError,
    ConfigLoader,
    EngineOptions,
    ModelCard,
    ModelFiles,
    ModelSource,
    ShardRange,
    default_model_path,
)
from skulk_core.plugins import PluginSelection, make_plugin_manager

from skulk_llamacpp import RUNTIME_OVERHEAD_BYTES, LlamaCppBackend, LlamaCppSettings


def test_core_is_installed_from_this_repository() -> None:
    # The PyPI project named `skulk` is unrelated; if pip took it, skulk_core would be missing.
    import skulk_core

    assert importlib.metadata.version("skulk").startswith("0.1")
    assert skulk_core.__version__.startswith("0.1")


def test_entry_point_is_registered() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="skulk")}
    assert "llamacpp" in eps, "run: pip install --no-deps -e plugins/skulk-llamacpp"
    assert eps["llamacpp"].value == "skulk_llamacpp.plugin"
    assert eps["llamacpp"].dist is not None and eps["llamacpp"].dist.name == "skulk-llamacpp"


def test_plugin_manager_finds_backend_and_config_section() -> None:
    plugins = make_plugin_manager(PluginSelection(autoload=False, plugins=("llamacpp",)))
    assert "llamacpp" in plugins.names()
    backend = plugins.backends().backend("llamacpp")
    assert backend.name == "llamacpp"
    assert backend.capabilities.formats == {"gguf"}
    assert not backend.capabilities.layer_ranges
    assert backend.capabilities.batching and backend.capabilities.embeddings
    assert plugins.config_sections().get("llamacpp") is LlamaCppSettings


def test_importing_the_plugin_does_not_import_llama_cpp() -> None:
    code = "import sys, skulk_llamacpp.plugin; assert 'llama_cpp' not in sys.modules, 'llama_cpp imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_section_from_file_and_environment() -> None:
    loader = ConfigLoader(
        document={"llamacpp": {"n_batch": 256}}, env={"SKULK_LLAMACPP_FLASH_ATTN": "false"}, cli={}
    )
    settings = loader.resolve({"llamacpp": LlamaCppSettings}).section("llamacpp")
    assert settings == LlamaCppSettings(n_batch=256, flash_attn=False)
    assert LlamaCppSettings().flash_attn  # on unless turned off


@pytest.mark.parametrize(
    ("document", "env", "mode"),
    [
        ({"decode_ahead": False}, {}, "never"),  # YAML's false, off and no
        ({"decode_ahead": True}, {}, "always"),
        ({"decode_ahead": "auto"}, {}, "auto"),
        ({}, {"SKULK_LLAMACPP_DECODE_AHEAD": "off"}, "never"),
        ({}, {"SKULK_LLAMACPP_DECODE_AHEAD": "Yes"}, "always"),
        ({}, {"SKULK_LLAMACPP_DECODE_AHEAD": "never"}, "never"),
    ],
)
def test_decode_ahead_takes_a_mode_or_a_boolean(document: dict, env: dict, mode: str) -> None:
    loader = ConfigLoader(document={"llamacpp": document}, env=env, cli={})
    assert loader.resolve({"llamacpp": LlamaCppSettings}).section("llamacpp").decode_ahead == mode


def test_config_section_rejects_bad_values() -> None:
    def resolve(section: dict) -> None:
        ConfigLoader(document={"llamacpp": section}, env={}, cli={}).resolve({"llamacpp": LlamaCppSettings})

    # the validator names its key once, as "llamacpp.decode_ahead"
    modes = "invalid configuration: llamacpp.decode_ahead must be one of auto, always, never; got 'sometimes'$"
    with pytest.raises(ConfigError, match=modes):
        resolve({"decode_ahead": "sometimes"})
    with pytest.raises(ConfigError, match=r"llamacpp.decode_ahead: expected a string, got \[2.5\]"):
        resolve({"decode_ahead": [2.5]})
    with pytest.raises(ConfigError, match="kv_cache_type"):
        resolve({"kv_cache_type": "q3"})
    with pytest.raises(ValueError, match="flash_attn"):
        LlamaCppSettings(kv_cache_type="q8_0", flash_attn=False)
    assert LlamaCppSettings(kv_cache_type="q8_0", flash_attn=True).kv_bytes_per_value == 34 / 32


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.from_gguf(default_model_path())


def test_supports_gguf_only(card: ModelCard) -> None:
    backend = LlamaCppBackend()
    assert backend.supports(card) is None
    reason = backend.supports(_card(format="safetensors"))
    assert reason is not None and "GGUF" in reason


def test_estimate_memory_formula(card: ModelCard) -> None:
    backend = LlamaCppBackend()
    options = EngineOptions(context_length=4096, max_sequences=8)
    kv = 2 * card.n_layers * card.n_kv_heads * card.head_dim * 2 * 4096 * 8  # K and V, f16
    assert backend.estimate_memory(card, ShardRange.whole(card.n_layers), options) == card.bytes_on_disk + kv + RUNTIME_OVERHEAD_BYTES
    quantized = EngineOptions(context_length=4096, max_sequences=8, settings=LlamaCppSettings(kv_cache_type="q4_0", flash_attn=True))
    assert backend.estimate_memory(card, ShardRange.whole(card.n_layers), quantized) < card.bytes_on_disk + kv // 3 + RUNTIME_OVERHEAD_BYTES


async def _load(card: ModelCard, shard: ShardRange, **options: object) -> None:
    backend = LlamaCppBackend()
    files = ModelFiles(card.id, "gguf", default_model_path())
    await backend.load(card, files, shard, EngineOptions(context_length=64, **options))  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_load_refuses_layer_ranges_and_other_devices(card: ModelCard) -> None:
    with pytest.raises(BackendError, match="whole models"):
        await _load(card, ShardRange(0, 10, 30))
    with pytest.raises(BackendError, match="CPU only"):
        await _load(card, ShardRange.whole(30), device="cuda")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _card(**changes: object) -> ModelCard:
    values: dict[str, object] = dict(
        id="m", architecture="llama", n_layers=2, hidden_size=64, n_heads=4, n_kv_heads=4, context_length=128,
        vocab_size=100, bytes_on_disk=1000, source=ModelSource(kind="local", path="/nowhere"),
    )
    values.update(changes)
    return ModelCard(**values)  # type: ignore[arg-type]


def test_load_tokenizer_reads_the_vocabulary_without_the_weights() -> None:
    import anyio

    from skulk_core import ModelCard, ModelFiles, default_model_path
    from skulk_llamacpp import LlamaCppBackend

    path = default_model_path()
    card = ModelCard.from_gguf(path, model_id="smollm2-135m-instruct")
    files = ModelFiles(card.id, "gguf", path, (path,))
    tokenizer = anyio.run(LlamaCppBackend().load_tokenizer, card, files)
    tokens = tokenizer.encode("<|im_start|>user\nHello", add_special=False)
    assert tokens[0] == 1 and len(tokens) > 3  # the chat marker is one special token
    assert b"".join(tokenizer.token_bytes(t) for t in tokens[1:]) == b"user\nHello"
    assert 2 in tokenizer.eos_token_ids and tokenizer.vocab_size == 49152
