"""Skulk's OpenAI-compatible frontend: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/v1/embeddings`` and ``/openapi.json`` on the node's HTTP port, and vLLM's
``/tokenize``, ``/detokenize`` and ``/tokenizer_info``.

The plugin mounts one Quart app, served by the node's Hypercorn server, at ``/v1``, at
``/openapi.json`` and at the tokenizer's paths. Quart is imported when the node starts its HTTP service, not when the plugin is
listed. See docs/openai.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skulk_core import hookimpl

if TYPE_CHECKING:
    from skulk_core import HttpRegistry
    from skulk_core.node import Node

__version__ = "0.1.0"


@hookimpl
def skulk_register_http(registry: HttpRegistry, node: Node) -> None:
    from skulk_openai.app import create_app

    app = create_app(node)
    registry.mount("/v1", app)
    registry.mount("/openapi.json", app)
    for path in ("/tokenize", "/detokenize", "/tokenizer_info"):
        registry.mount(path, app)
