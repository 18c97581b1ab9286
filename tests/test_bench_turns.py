"""The chat-turns benchmark's table (benchmarks/turns.py): the ratios it prints are its result."""

from __future__ import annotations

import pytest

BENCHMARK = "turns"


@pytest.fixture(scope="module")
def turns(benchmark_script):  # type: ignore[no-untyped-def]
    return benchmark_script


def test_the_table_prints_each_server_and_the_ratios(turns, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    report = {
        "settings": {"threads": 2, "users": 4, "turns": 5, "answer_tokens": 16, "runs": 2},
        "next_turn_first_token_s": {"skulk": 0.069, "skulk-no-cache": 1.194, "peer": 1.454},
        "ranges": {"skulk": [0.065, 0.076], "skulk-no-cache": [1.137, 1.226], "peer": [1.39, 1.577]},
        "prompt_tokens": {"skulk": 547, "skulk-no-cache": 547, "peer": 547},
        "cached_tokens": {"skulk": 528, "skulk-no-cache": 0, "peer": 0},
        "skulk_vs_peer": 0.047,
        "skulk_vs_no_cache": 0.058,
    }
    turns.print_table(report)
    out = capsys.readouterr().out
    assert "the next turn of 4 interleaved chats after 5 turns each" in out
    assert "skulk's next turn starts in 0.05x the peer's time, 0.06x its own without prompt_cache" in out
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["skulk", "skulk-no-cache", "peer"]
