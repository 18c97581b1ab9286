"""A node's stable identity: an Ed25519 key pair created once under the data dir.

The node id is derived from the public key, so a node cannot claim another's id without its key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from attrs import field, frozen

from skulk_core.errors import ConfigError

KEY_FILE = "node_key.pem"


def node_id_for(public_key: bytes) -> str:
    digest = hashlib.sha256(public_key).digest()[:10]
    return base64.b32encode(digest).decode().lower()


@frozen
class NodeIdentity:
    node_id: str
    public_key: bytes  # raw 32-byte Ed25519 public key
    private_key: bytes = field(repr=False)  # raw 32-byte seed

    def sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(self.private_key).sign(data)

    @staticmethod
    def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    @classmethod
    def load_or_create(cls, data_dir: Path) -> NodeIdentity:
        """Load ``<data_dir>/identity/node_key.pem``, creating it (mode 0600) on first start."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        path = data_dir / "identity" / KEY_FILE
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"the node key {path} is unreadable ({exc}); move it away to make a new identity"
                ) from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"the node key {path} is not an Ed25519 key")
        else:
            key = Ed25519PrivateKey.generate()
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            os.replace(tmp, path)  # atomic: a crash never leaves half a key
        raw_private = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(node_id=node_id_for(raw_public), public_key=raw_public, private_key=raw_private)
