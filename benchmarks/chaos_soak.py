"""Chaos soak: a mocker cluster over real etcd and NATS under steady streaming load for
`--duration` seconds while faults hit it in turn (`dynamo_gateway.testing.chaos`):
SIGKILL a worker (and start another), restart etcd, SIGSTOP a worker past its lease,
restart NATS; and every few rounds of those, restart the frontend. Every answer is
checked token for token against the fault-free one.

Prints the counts, TTFT p50/p99 during and outside faults and the KV hit rate's
recovery time after each fault; writes the whole report as JSON and plots RSS of the
frontend and workers over time with the faults marked::

    python benchmarks/chaos_soak.py --duration 600 \\
        --json benchmarks/results/chaos_soak.json --plot benchmarks/results/chaos_soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dynamo_gateway.models.demo import build_demo_model
from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.testing.chaos import (
    ChaosRun,
    LoadConfig,
    RssSampler,
    Schedule,
    SteadyLoad,
    chaos_prompts,
    report,
    run_chaos,
)
from dynamo_gateway.testing.cluster import Cluster


async def soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    model = args.model or build_demo_model(root / "demo")
    with EtcdServer(root / "etcd") as etcd, NatsServer(root / "nats") as nats:
        cluster = Cluster(root / "logs", model, etcd.url, nats.url)
        (root / "logs").mkdir()
        chaos = ChaosRun(cluster, etcd, nats, [("--speedup", str(args.speedup))] * args.workers)
        try:
            url = await asyncio.to_thread(chaos.start)
            cfg = LoadConfig(url, concurrency=args.concurrency, max_tokens=args.max_tokens)
            prompts = chaos_prompts(documents=args.documents, questions=4)
            expected = await SteadyLoad.answers(cfg, prompts)
            load = SteadyLoad(cfg, prompts, expected, progress=lambda m: print(m, flush=True))
            # The frontend restarts once per `--frontend-every` rounds of the other
            # faults, so that its memory is watched over a long life too.
            others = ("kill_worker", "restart_etcd", "pause_worker", "restart_nats")
            kinds = others * args.frontend_every + ("restart_frontend",)
            schedule = Schedule(duration_s=args.duration, interval_s=args.interval, kinds=kinds)
            with RssSampler(chaos.pids) as rss:
                outcomes, started, ended = await run_chaos(
                    chaos, load, schedule, progress=lambda m: print(m, flush=True)
                )
            result = report(outcomes, chaos.faults, started=started, ended=ended, rss=rss.samples)
            result["config"] = {k: str(v) for k, v in vars(args).items()}
            return result
        finally:
            cluster.stop_all()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    samples = result["rss_mib"]
    t = [s["t"] for s in samples]
    front = [s.get("frontend") for s in samples]
    workers = [
        max((v for k, v in s.items() if k.startswith("worker")), default=None) for s in samples
    ]
    ax.plot(t, front, label="frontend RSS")
    ax.plot(t, workers, label="largest worker RSS")
    colors = {"kill_worker": "C3", "restart_etcd": "C4", "pause_worker": "C5",
              "restart_nats": "C6", "restart_frontend": "C7"}  # fmt: skip
    seen: set[str] = set()
    for f in result["faults"]:
        kind = f["kind"]
        ax.axvspan(f["start"], max(f["end"], f["start"] + 0.5), color=colors.get(kind, "C8"),
                   alpha=0.3, label=None if kind in seen else kind)  # fmt: skip
        seen.add(kind)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"chaos soak: {result['requests']} requests, {result['failed']} failed, "
        f"{result['corrupted']} corrupted, {len(result['faults'])} faults"
    )
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--interval", type=float, default=15.0, help="clean seconds after a fault")
    p.add_argument(
        "--frontend-every", type=int, default=3, help="rounds of other faults per frontend restart"
    )
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=12, help="streams kept in flight")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--documents", type=int, default=6, help="shared prefixes (4 prompts each)")
    p.add_argument("--speedup", type=float, default=2.0, help="mocker speedup")
    p.add_argument("--model", type=Path, help="model directory (default: build the demo)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--plot", type=Path, help="draw RSS over time here (PNG)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    result = asyncio.run(soak(args, tmp))
    if result["failed"] or result["corrupted"]:  # keep the processes' logs to look into
        print(f"cluster logs kept in {tmp / 'logs'}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {k: v for k, v in result.items() if k not in ("rss_mib", "config")}
    print(json.dumps(summary, indent=1))
    rss = result["rss_mib"]
    if rss:
        front = [s["frontend"] for s in rss if "frontend" in s]
        print(f"frontend RSS MiB: first {front[0]:.0f}, max {max(front):.0f}, last {front[-1]:.0f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot is not None:
        plot(result, args.plot)
    return 0 if result["failed"] == 0 and result["corrupted"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
