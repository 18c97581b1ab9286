"""A node's identity: created once under its data dir, stable across restarts, key file mode 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from skulk_core import ConfigError, NodeIdentity
from skulk_core.config import ConfigLoader
from skulk_core.identity import node_id_for
from skulk_core.node import build_node


def test_identity_is_created_once_and_stable(tmp_path: Path):
    first = NodeIdentity.load_or_create(tmp_path)
    key_file = tmp_path / "identity" / "node_key.pem"
    assert key_file.is_file()
    second = NodeIdentity.load_or_create(tmp_path)
    assert second == first
    assert first.node_id == node_id_for(first.public_key)
    assert len(first.public_key) == 32 and len(first.private_key) == 32
    assert first.private_key.hex() not in repr(first)


def test_key_file_is_private(tmp_path: Path):
    NodeIdentity.load_or_create(tmp_path)
    key_file = tmp_path / "identity" / "node_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert not list(key_file.parent.glob("*.tmp"))


def test_two_data_dirs_are_two_nodes(tmp_path: Path):
    assert NodeIdentity.load_or_create(tmp_path / "a").node_id != NodeIdentity.load_or_create(tmp_path / "b").node_id


def test_node_id_survives_a_restart(tmp_path: Path):
    loader = ConfigLoader(env={}, cli={"node": {"data_dir": str(tmp_path)}})
    first = build_node(loader, autoload=False)
    again = build_node(loader, autoload=False)
    assert first.node_id == again.node_id == NodeIdentity.load_or_create(tmp_path).node_id


def test_signatures(tmp_path: Path):
    identity = NodeIdentity.load_or_create(tmp_path)
    signature = identity.sign(b"hello")
    assert NodeIdentity.verify(identity.public_key, signature, b"hello")
    assert not NodeIdentity.verify(identity.public_key, signature, b"hellO")
    other = NodeIdentity.load_or_create(tmp_path / "other")
    assert not NodeIdentity.verify(other.public_key, signature, b"hello")


def test_unreadable_key_says_what_to_do(tmp_path: Path):
    key_file = tmp_path / "identity" / "node_key.pem"
    key_file.parent.mkdir()
    key_file.write_text("not a key")
    with pytest.raises(ConfigError, match="unreadable.*move it away to make a new identity"):
        NodeIdentity.load_or_create(tmp_path)
