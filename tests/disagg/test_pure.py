"""The pure parts of disaggregation: layouts, run merging, params, the policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_gateway.disagg.layout import BlockRun, KvLayout, incompatibility, merge_runs
from dynamo_gateway.disagg.params import PrefillDone, parse_prefill_done, prefill_leg_failed
from dynamo_gateway.disagg.policy import LocalReason, PrefillLoad, decide
from dynamo_gateway.protocol.engine import EngineOutput, FinishReason

LAYOUT = KvLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float32")


def test_layout_sizes() -> None:
    assert LAYOUT.planes == 60
    assert LAYOUT.page_bytes == 16 * 3 * 64 * 4
    assert LAYOUT.block_bytes == 737_280  # SmolLM2-135M in fp32
    assert KvLayout.from_dict(LAYOUT.to_dict()) == LAYOUT


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_layers", 32),
        ("num_kv_heads", 4),
        ("head_dim", 128),
        ("block_size", 32),
        ("dtype", "bfloat16"),
    ],
)
def test_incompatibility_names_the_field(field: str, value: object) -> None:
    other = KvLayout(**{**LAYOUT.to_dict(), field: value})
    why = incompatibility(LAYOUT, other)
    assert why is not None and field in why and str(value) in why
    assert incompatibility(LAYOUT, LAYOUT) is None


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown KV dtype"):
        KvLayout(num_layers=1, num_kv_heads=1, head_dim=1, block_size=1, dtype="int4")
    with pytest.raises(ValueError, match="positive"):
        KvLayout(num_layers=0, num_kv_heads=1, head_dim=1, block_size=1, dtype="float32")
    with pytest.raises(ValueError, match="malformed"):
        KvLayout.from_dict({"num_layers": "many"})


def test_merge_runs() -> None:
    assert merge_runs([5, 6, 7, 9], [0, 1, 2, 3]) == [BlockRun(5, 0, 3), BlockRun(9, 3, 1)]
    # Contiguous on one side only: no merge.
    assert merge_runs([1, 2], [4, 6]) == [BlockRun(1, 4, 1), BlockRun(2, 6, 1)]
    assert merge_runs(list(range(100)), list(range(50, 150))) == [BlockRun(0, 50, 100)]
    assert merge_runs([], []) == []
    with pytest.raises(ValueError):
        merge_runs([1], [])


def test_prefill_done_round_trip_and_errors() -> None:
    done = PrefillDone(
        remote_engine_id="p",
        transfer_id="p/1",
        remote_block_ids=[3, 4],
        num_tokens=20,
        layout=LAYOUT.to_dict(),
        transports={"tcp": {"host": "127.0.0.1", "port": 1}},
        expires_at=1.0,
    )
    assert parse_prefill_done(done.to_dict()) == done
    with pytest.raises(ValueError, match="malformed"):
        parse_prefill_done({"do_remote_prefill": True})
    with pytest.raises(ValueError, match="no blocks"):
        parse_prefill_done({**done.to_dict(), "remote_block_ids": []})


BASE = {
    "prompt_tokens": 2000,
    "cached_tokens": 0,
    "new_tokens_wanted": 100,
    "prefill_workers": 2,
    "decode_role": True,
    "least_queued_prefill_tokens": 0,
    "min_prefill_tokens": 512,
    "max_queued_prefill_tokens": 8192,
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"prefill_workers": 0}, LocalReason.NO_PREFILL_WORKERS),
        ({"decode_role": False}, LocalReason.NOT_DECODE_ROLE),
        ({"new_tokens_wanted": 1}, LocalReason.SINGLE_TOKEN),
        ({"prompt_tokens": 400}, LocalReason.SHORT_PROMPT),
        # Long, but the decode worker holds most of it: only the rest counts.
        ({"cached_tokens": 1600}, LocalReason.SHORT_PROMPT),
        ({"least_queued_prefill_tokens": 8192}, LocalReason.SATURATED),
        ({"least_queued_prefill_tokens": 8191}, None),
    ],
)
def test_decide(change: dict[str, object], reason: LocalReason | None) -> None:
    decision = decide(**{**BASE, **change})  # type: ignore[arg-type]
    assert decision.remote is (reason is None)
    assert decision.reason is reason


def test_prefill_load() -> None:
    load = PrefillLoad()
    load.add("a", "p0", 100)
    load.add("b", "p0", 50)
    load.add("c", "p1", 10)
    assert load.least(["p0", "p1"]) == 10
    assert load.least(["p0", "p1", "p2"]) == 0
    load.done("a")
    load.done("a")  # idempotent
    assert load.queued("p0") == 50
    load.remove_worker("p0")
    assert load.queued("p0") == 0
    load.done("b")  # its worker left: nothing to undo
    assert load.least([]) == 0


def test_stale_shm_pools_of_dead_processes_are_removed(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from dynamo_gateway.disagg.transports.shm import PREFIX, remove_stale_pools

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f"{PREFIX}{dead.stdout.strip()}-w-1"
    live = tmp_path / f"{PREFIX}{os.getpid()}-w-2"
    other = tmp_path / "unrelated"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_stale_pools(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.parametrize(
    ("finish", "tokens", "params", "failed"),
    [
        (FinishReason.LENGTH, [7], {"transfer_id": "t"}, False),  # ours: the first token + handoff
        (FinishReason.LENGTH, [], {"bootstrap_room": 3}, False),  # SGLang: decode makes every token
        (FinishReason.STOP, [2], None, False),  # EOS first: the whole answer
        (FinishReason.LENGTH, [], None, True),  # nothing at all
        (FinishReason.ERROR, [7], {"transfer_id": "t"}, True),
        (FinishReason.ABORT, [], {"bootstrap_room": 3}, True),
    ],
)
def test_prefill_leg_failed(
    finish: FinishReason, tokens: list[int], params: dict[str, object] | None, failed: bool
) -> None:
    last = EngineOutput(token_ids=tokens, finish_reason=finish, kv_transfer_params=params)
    assert prefill_leg_failed(last, tokens) is failed
