"""Server-sent events as the frontend encodes them."""

from __future__ import annotations

import json

import pytest

from skulk_openai import wire


@pytest.mark.parametrize("text", ["", "Hello", ' "quoted" \\ back', "line\nbreak\ttab", "é 漢字 🦊", "\x00\x1f", wire.TEXT_SLOT])
def test_an_event_with_a_text_slot_is_the_event_with_that_text(text: str) -> None:
    base = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m", "usage": None}
    shape = {**base, "choices": [{"index": 0, "delta": {"content": wire.TEXT_SLOT}, "logprobs": None, "finish_reason": None}]}
    event = wire.sse_with_text(shape)(text)
    assert event == wire.sse({**base, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]})
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["choices"][0]["delta"]["content"] == text


def test_a_shape_without_exactly_one_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="exactly once"):
        wire.sse_with_text({"text": "no slot"})
    with pytest.raises(ValueError, match="exactly once"):
        wire.sse_with_text({"a": wire.TEXT_SLOT, "b": wire.TEXT_SLOT})
