"""End to end: hundreds of concurrent streams beyond the limits, slow readers and
clients that vanish mid-stream. Every client is served or shed cleanly, a probe
still gets its answer, no request stays in a worker and RSS does not grow per round.

The full-size run (2,000 clients a round, RSS over time) is
``benchmarks/overload_memory.py``; see docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable

import psutil

from dynamo_gateway.bench.overload import (
    ClientKind,
    Mix,
    RoundResult,
    classify,
    run_round,
    worker_gauges,
)
from dynamo_gateway.testing import GatewayProcess

CLIENTS = 500
ROUNDS = 4
KEEP_ALIVE_S = 1.0
# Rounds 2 to 4 together may add at most this much RSS over round 1. With the old
# 75 s keep-alive each round's closed connections stayed in the server (~14 KiB
# each: ~7 MiB a round, ~21 over three rounds, measured); with the fix the
# allocator's wobble after a round measured 0 to 3.4 MiB.
GROWTH_BOUND_MIB = 14.0


def _rss_mib(gw: GatewayProcess) -> float:
    return float(psutil.Process(gw.process.pid).memory_info().rss) / 2**20


def _fds(gw: GatewayProcess) -> int:
    return int(psutil.Process(gw.process.pid).num_fds())


def _round(gw: GatewayProcess, mix: Mix) -> RoundResult:
    result = asyncio.run(run_round(gw.url, CLIENTS, mix, timeout=60))
    # Idle past the keep-alive, so that the server closes what the clients left.
    time.sleep(KEEP_ALIVE_S + 1.5)
    return result


def _settled(gw: GatewayProcess) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if worker_gauges(gw.url, "worker_active_requests") == [0.0] and worker_gauges(
            gw.url, "worker_kv_blocks_used"
        ) == [0.0]:
            return True
        time.sleep(0.1)
    return False


def test_overload_sheds_cleanly_and_memory_is_bounded(
    gateway_server: Callable[..., GatewayProcess],
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * CLIENTS + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * CLIENTS), hard))
    gw = gateway_server(
        "--workers", "1", "--speedup", "1", "--max-inflight", "32",
        "--max-queued-per-tenant", "16", "--queue-timeout", "0.5",
        "--keep-alive", str(KEEP_ALIVE_S),
    )  # fmt: skip
    mix = Mix(slow=0.25, vanish=0.25, slow_sleep_s=0.05, vanish_after=2, max_tokens=40)

    fds_idle = _fds(gw)
    rss: list[float] = []
    for i in range(ROUNDS):
        result = _round(gw, mix)
        rss.append(_rss_mib(gw))
        t = result.tally
        assert t.failed == 0, (i, t.as_dict(), gw.log()[-3000:])
        assert t.served > 0 and t.shed > 0, t.as_dict()
        # Slow readers and vanishing clients were among the admitted ones.
        admitted = {o.kind for o in result.outcomes if o.status == 200}
        assert admitted == set(ClientKind), admitted
        # Every probe got an answer (served, or shed with Retry-After) during the load.
        assert result.probes, "no probe was sent during the round"
        verdicts = [classify(p) for p in result.probes]
        assert set(verdicts) <= {"served", "shed"}, verdicts
        assert _settled(gw), (worker_gauges(gw.url, "worker_active_requests"), gw.log()[-3000:])
        # The server closed every connection the clients left (the keep-alive bound).
        assert _fds(gw) <= fds_idle + 4, (fds_idle, _fds(gw))

    growth = max(rss[1:]) - rss[0]
    assert growth <= GROWTH_BOUND_MIB, f"RSS after each round (MiB): {rss}"
