"""The scoring benchmark's check of each server's prompt log-probabilities against raw llama.cpp
(benchmarks/scoring.py): it is what tells a server that scores the wrong positions."""

from __future__ import annotations

import pytest

BENCHMARK = "scoring"


@pytest.fixture(scope="module")
def scoring(benchmark_script):  # type: ignore[no-untyped-def]
    return benchmark_script


def test_compare_tells_right_scores_from_shifted_and_missing_ones(scoring) -> None:  # type: ignore[no-untyped-def]
    reference = [-0.5, -2.0, -0.1, -7.0]
    right = {"token_logprobs": [None, -0.51, -2.02, -0.1, -7.0, -1.0]}  # the generated token's entry at the end
    assert scoring.compare(reference, right) == {"positions": 4, "max_abs_diff": 0.02, "within": 4, "agree": True}
    assert scoring.compare(reference, {"token_logprobs": [None, -0.7, -2.0, -0.1, -7.0]})["agree"] is True  # kernel noise
    shifted = {"token_logprobs": [None, -2.0, -0.1, -7.0, -0.3, -1.0]}  # each token scored one position late
    check = scoring.compare(reference, shifted)
    assert not check["agree"] and check["within"] == 0 and check["max_abs_diff"] == 6.9
    assert scoring.compare(reference, {"token_logprobs": [None, -0.5, None, -0.1, -7.0]})["agree"] is False
    assert scoring.compare(reference, {"token_logprobs": [None, -0.5]}) == {"positions": 1, "max_abs_diff": None, "agree": False}


def test_the_table_prints_the_ratio_and_the_verdicts(scoring, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    report = {
        "settings": {"threads": 2, "prompt_tokens": 721, "runs": 3, "context_length": 4096},
        "seconds": {"skulk": 1.96, "peer": 18.71, "raw": 2.0},
        "ranges": {"skulk": [1.95, 2.14], "peer": [18.55, 21.5], "raw": [1.94, 2.04]},
        "tokens_per_s": {"skulk": 367.8, "peer": 38.5, "raw": 359.8},
        "skulk_speedup_vs_peer": 9.55,
        "skulk_vs_raw": 1.02,
        "agreement_with_raw": {
            "skulk": {"positions": 720, "max_abs_diff": 0.0, "within": 720, "agree": True},
            "peer": {"positions": 720, "max_abs_diff": 22.0, "within": 0, "agree": False},
        },
        "token_id_prompt_status": {"skulk": 200, "peer": 500},
        "choices": {
            "answers": 4,
            "seconds": {"skulk": 2.1, "peer": 60.0, "raw": 2.0},
            "ranges": {"skulk": [2.0, 2.2], "peer": [59.0, 61.0], "raw": [1.9, 2.1]},
            "skulk_speedup_vs_peer": 28.57,
            "skulk_vs_raw": 0.95,
        },
    }
    scoring.print_table(report)
    out = capsys.readouterr().out
    assert "skulk scores 9.55x as fast as the peer, at 1.02x raw's speed" in out
    assert "skulk: agrees with raw (720 of 720 positions within 0.25)" in out
    assert "peer: does NOT agree with raw (0 of 720 positions within 0.25)" in out
    assert "skulk HTTP 200, peer HTTP 500" in out
    assert "each of 4 answers (one request each): skulk 2.10 s, peer 60.00 s, raw 2.00 s; skulk 28.57x" in out
