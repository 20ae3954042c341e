"""The virtual-clock loop, and replays scaled by the planner on it and in real time."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from dynamo_gateway import clock
from dynamo_gateway.bench import vclock
from dynamo_gateway.bench.replay import ReplayConfig, ReplayResult, replay
from dynamo_gateway.bench.scaled import sla_attainment, worker_seconds
from dynamo_gateway.cli import main as cli_main

# -- the loop ------------------------------------------------------------------------------


def test_sleeping_an_hour_takes_no_real_time() -> None:
    async def main() -> tuple[float, float]:
        await asyncio.sleep(3600)
        return asyncio.get_running_loop().time(), clock.now()

    real = time.perf_counter()
    assert vclock.run(main()) == (3600.0, 3600.0)
    assert time.perf_counter() - real < 5
    assert clock.now() != 3600.0  # the real clock is back after the run


def test_timers_fire_in_order_at_their_simulated_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        seen: list[tuple[str, float]] = []

        async def at(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            seen.append((name, loop.time()))

        loop.call_later(0.25, lambda: seen.append(("call_later", loop.time())))
        await asyncio.gather(at("c", 0.3), at("a", 0.1), at("b", 0.2))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(10):
                await asyncio.sleep(60)
        seen.append(("timeout", loop.time()))
        return seen

    seen = vclock.run(main())
    assert [name for name, _ in seen] == ["a", "b", "call_later", "c", "timeout"]
    assert [t for _, t in seen] == pytest.approx([0.1, 0.2, 0.25, 0.3, 10.3])


def test_executor_work_runs_inline_and_takes_no_simulated_time() -> None:
    async def main() -> tuple[float, list[str]]:
        loop = asyncio.get_running_loop()
        order: list[str] = []

        async def timer() -> None:
            await asyncio.sleep(0.001)
            order.append("timer")

        def work() -> str:
            time.sleep(0.2)  # real time: the simulated 1 ms timer must not fire first
            return "thread"

        task = loop.create_task(timer())
        order.append(await asyncio.to_thread(work))
        await task
        return loop.time(), order

    t, order = vclock.run(main())
    assert order == ["thread", "timer"]
    assert t == pytest.approx(0.001)


# -- pure judging --------------------------------------------------------------------------


def test_worker_seconds_clip_lifetimes_to_the_window() -> None:
    lifetimes = [(0.0, 100.0), (-5.0, None), (50.0, 60.0), (120.0, 130.0)]
    assert worker_seconds(lifetimes, 10.0, 110.0) == pytest.approx(90 + 100 + 10)


def test_sla_attainment_counts_failures_as_misses() -> None:
    rows = [
        {"ok": True, "ttft_ms": 100.0, "itl_ms": 10.0},
        {"ok": True, "ttft_ms": 900.0, "itl_ms": 10.0},
        {"ok": True, "ttft_ms": 100.0, "itl_ms": 90.0},
        {"ok": True, "ttft_ms": 100.0, "itl_ms": None},  # one token: no ITL to miss
        {"ok": False, "ttft_ms": None, "itl_ms": None},
    ]
    got = sla_attainment(rows, ttft_ms=500, itl_ms=50)
    assert got == {"ttft": 0.6, "itl": 0.6, "both": 0.4, "requests": 5.0}


# -- replays scaled by the planner ---------------------------------------------------------

PLANNER = """
interval_s = 1
cooldown_s = 4
[load]
target_requests = 4
up_intervals = 2
down_intervals = 3
[[models]]
ttft_ms = 1000
itl_ms = 50
pools = { aggregated = { min = 1, max = 6 } }
"""


@pytest.fixture(scope="module")
def step_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 s: 1 request/s, then 6/s for 12 s, then 1/s; a shared two-block system prompt."""
    rng = random.Random(7)
    rows, t, next_id = [], 0.0, 2
    for seconds, rate in ((12, 1.0), (12, 6.0), (12, 1.0)):
        end = t + seconds
        while (t := t + rng.expovariate(rate)) < end:
            own = list(range(next_id, next_id + rng.randint(2, 5)))
            next_id += len(own)
            rows.append(
                {
                    "timestamp": int(t * 1000),
                    "input_length": 512 * (2 + len(own)) - 100,
                    "output_length": rng.randint(60, 250),
                    "hash_ids": [0, 1, *own],
                }
            )
        t = end
    path = tmp_path_factory.mktemp("traces") / "step.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scaled(trace: Path, model: Path, planner: Path, *, virtual: bool) -> ReplayResult:
    return replay(
        ReplayConfig(
            trace=trace, model=model, router="kv", planner=planner, virtual_clock=virtual,
            worker_startup_s=2.0, progress=False,
        ),
        uvloop=False,
    )  # fmt: skip


def test_a_virtual_replay_makes_the_live_replays_decisions(
    step_trace: Path, demo_model: Path, tmp_path: Path
) -> None:
    planner = tmp_path / "planner.toml"
    planner.write_text(PLANNER)
    real = time.perf_counter()
    virtual = _scaled(step_trace, demo_model, planner, virtual=True)
    virtual_real_s = time.perf_counter() - real
    live = _scaled(step_trace, demo_model, planner, virtual=False)
    v, lv = virtual.summary, live.summary
    assert v["errors"] == 0 and lv["errors"] == 0, (v["error_samples"], lv["error_samples"])
    # The load step made the planner add workers, and the calm after it drained them.
    assert v["planner"]["max_workers"] >= 3
    kinds = [(d["current"] < d["target"]) for d in v["planner"]["decisions"]]
    assert True in kinds and False in kinds
    # The same routing and scaling, within what a live run's timing noise allows.
    assert v["cache_hit_rate"] == pytest.approx(lv["cache_hit_rate"], abs=0.03)
    assert v["planner"]["max_workers"] == lv["planner"]["max_workers"]
    steps_v = [(d["current"], d["target"]) for d in v["planner"]["decisions"]]
    steps_l = [(d["current"], d["target"]) for d in lv["planner"]["decisions"]]
    assert steps_v == steps_l, (v["planner"]["decisions"], lv["planner"]["decisions"])
    assert v["worker_seconds"] == pytest.approx(lv["worker_seconds"], rel=0.1)
    # Fewer worker-seconds than a fleet of the peak size over the whole run.
    assert v["worker_seconds"] < v["planner"]["max_workers"] * v["duration_s"]
    assert v["sla"]["requests"] == v["requests"]
    # 36 s of trace: the live run took them in real time, the virtual one did not.
    assert lv["real_s"] >= 30
    assert virtual_real_s < lv["real_s"] / 3


def test_a_virtual_replay_is_deterministic(
    step_trace: Path, demo_model: Path, tmp_path: Path
) -> None:
    planner = tmp_path / "planner.toml"
    planner.write_text(PLANNER)
    runs = [_scaled(step_trace, demo_model, planner, virtual=True) for _ in range(2)]
    first, second = ([(p["ttft_ms"], p["e2e_ms"], p["cached_tokens"]) for p in r.per_request]
                     for r in runs)  # fmt: skip
    assert first == second
    assert runs[0].summary["planner"]["decisions"] == runs[1].summary["planner"]["decisions"]


def test_cli_virtual_replay_with_a_planner(
    step_trace: Path, demo_model: Path, tmp_path: Path
) -> None:
    planner = tmp_path / "planner.toml"
    planner.write_text(PLANNER)
    out = tmp_path / "r.json"
    argv = ["bench", "replay", "--trace", str(step_trace), "--model", str(demo_model)]
    argv += ["--virtual-clock", "--planner", str(planner), "--router", "kv", "--no-progress"]
    argv += ["--ttft-target-ms", "80", "--json", str(out)]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["errors"] == 0
    assert data["sla"]["ttft_target_ms"] == 80 and data["sla"]["itl_target_ms"] == 50
    assert 0 < data["sla"]["ttft"] <= 1
    timeline = data["planner"]["timeline"]
    assert timeline and max(live for _, live, _, _ in timeline) >= 3
    # --speedup with --virtual-clock, and a planner file with two models, are refused.
    assert cli_main([*argv[:4], "--virtual-clock", "--speedup", "4"]) == 2
    planner.write_text(PLANNER + '[[models]]\nname = "x"\npath = "."\n')
    assert cli_main(argv) == 2
