"""Tests for trace replay: token synthesis, schedules, and small in-process replays."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dynamo_gateway.bench.replay import ReplayConfig, ReplayResult, run_replay
from dynamo_gateway.bench.trace import (
    PromptSynthesizer,
    TraceRequest,
    arrival_offsets,
    load_trace,
)
from dynamo_gateway.cli import main as cli_main

BENCH_KEYS = {
    "requests",
    "errors",
    "duration_s",
    "req_per_s",
    "output_tok_per_s",
    "events_per_s",
    "output_tokens",
    "events",
    "ttft_ms",
    "itl_ms",
    "e2e_ms",
    "error_samples",
}
REPLAY_KEYS = {"cache_hit_rate", "prompt_tokens", "cached_tokens", "tpot_ms", "dispatch_lag_ms"}


def _write_trace(path: Path, n: int = 20, gap_ms: float = 100.0) -> Path:
    """``n`` requests in 4 conversations: each shares its conversation's leading blocks."""
    with path.open("w") as fh:
        for i in range(n):
            conv = i % 4
            turn = i // 4
            hash_ids = [100 * conv + k for k in range(turn + 2)]
            row = {
                "timestamp": i * gap_ms,
                "input_length": 32 * len(hash_ids) - 5,  # the last block is partial
                "output_length": 4,
                "hash_ids": hash_ids,
            }
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return _write_trace(tmp_path / "trace.jsonl")


def _replay(config: ReplayConfig) -> ReplayResult:
    return asyncio.run(run_replay(config))


# -- pure parts --------------------------------------------------------------------------


def test_equal_hash_ids_give_equal_blocks() -> None:
    synth = PromptSynthesizer(vocab_size=2048, trace_block_size=512)
    a = synth.prompt([1, 2, 3], 3 * 512)
    b = synth.prompt([1, 2, 9], 3 * 512)
    assert a[:1024] == b[:1024]
    assert a[1024:] != b[1024:]
    assert synth.prompt([7], 512) == PromptSynthesizer(2048, 512).prompt([7], 512)
    # Position does not matter: hash id 2 is the same block first or second.
    assert synth.prompt([2], 512) == a[512:1024]
    assert all(0 <= t < 2048 for t in a)


def test_different_hash_ids_give_different_blocks() -> None:
    synth = PromptSynthesizer(vocab_size=2048, trace_block_size=64)
    blocks = {tuple(synth.block(h).tolist()) for h in range(200)}
    assert len(blocks) == 200


def test_prompt_is_cut_and_padded_to_input_length() -> None:
    synth = PromptSynthesizer(vocab_size=100, trace_block_size=16)
    assert len(synth.prompt([1, 2], 20)) == 20
    padded = synth.prompt([1], 40, pad_key=3)  # 40 tokens from one 16-token id
    assert len(padded) == 40
    assert padded[:16] == synth.prompt([1], 16)
    assert padded != synth.prompt([1], 40, pad_key=4)  # padding is per request


def test_load_trace_and_limit(trace: Path) -> None:
    assert len(load_trace(trace)) == 20
    reqs = load_trace(trace, limit=5)
    assert len(reqs) == 5
    assert reqs[1] == TraceRequest(100.0, 59, 4, (100, 101))


def test_load_trace_rejects_bad_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_trace(bad)


def test_arrival_offsets_scale_with_speedup() -> None:
    reqs = [TraceRequest(t, 1, 1, ()) for t in (1000.0, 1500.0, 3000.0)]
    assert arrival_offsets(reqs, 1.0) == [0.0, 0.5, 2.0]
    assert arrival_offsets(reqs, 4.0) == [0.0, 0.125, 0.5]
    with pytest.raises(ValueError):
        arrival_offsets(reqs, 0.0)


# -- replays through the frontend --------------------------------------------------------


def test_replay_two_workers_round_robin(trace: Path, demo_model: Path) -> None:
    result = _replay(
        ReplayConfig(
            trace=trace,
            model=demo_model,
            workers=2,
            router="round_robin",
            speedup=50.0,
            progress=False,
        )
    )
    data = result.to_json_dict()
    assert data.keys() >= BENCH_KEYS | REPLAY_KEYS
    assert data["requests"] == 20 and data["errors"] == 0, data["error_samples"]
    assert data["output_tokens"] == 20 * 4
    assert data["ttft_ms"]["mean"] is not None and data["ttft_ms"]["mean"] > 0
    assert len(data["per_request"]) == 20
    first = data["per_request"][0]
    assert first["prompt_tokens"] == 59 and first["output_tokens"] == 4
    # Trace time: 19 gaps of 100 ms, whatever the speedup.
    assert data["duration_s"] >= 1.9
    json.dumps(data)  # JSON-ready


def test_cache_hits_when_prefixes_share_a_worker(trace: Path, demo_model: Path) -> None:
    result = _replay(
        ReplayConfig(trace=trace, model=demo_model, workers=1, speedup=50.0, progress=False)
    )
    s = result.summary
    assert s["errors"] == 0
    assert s["cached_tokens"] > 0
    assert s["cache_hit_rate"] is not None and 0 < s["cache_hit_rate"] < 1
    # Turn 2 of conversation 0 (request 4) finds turn 1's two blocks (64 tokens) cached.
    assert result.per_request[4]["cached_tokens"] >= 48


def test_limit_and_arrival_speedup(trace: Path, demo_model: Path) -> None:
    base = ReplayConfig(trace=trace, model=demo_model, workers=1, speedup=20.0, progress=False)
    slow = _replay(base)
    base.arrival_speedup = 10.0
    base.limit = 8
    fast = _replay(base)
    assert fast.summary["requests"] == 8
    arrivals = [p["arrival_ms"] for p in fast.per_request]
    assert arrivals[-1] == pytest.approx(7 * 100.0 / 10.0)
    assert fast.summary["duration_s"] < slow.summary["duration_s"] / 3


def test_cli_replay_writes_json(trace: Path, demo_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["bench", "replay", "--trace", str(trace), "--model", str(demo_model)]
    argv += ["--workers", "2", "--speedup", "50", "--limit", "6", "--no-progress"]
    argv += ["--json", str(out)]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["requests"] == 6 and data["router"] == "round_robin"


def test_cli_bad_replay_arguments(trace: Path) -> None:
    assert cli_main(["bench", "replay", "--trace", str(trace), "--speedup", "0"]) == 2
