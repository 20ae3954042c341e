"""Overload and memory: rounds of thousands of concurrent streams against one gateway.

Starts ``dynamo-gateway serve --engine mocker`` as a subprocess, samples its RSS
(psutil, every ``--sample-s``) for the whole run, and sends ``--rounds`` rounds of
``--clients`` concurrent streaming chat requests (`dynamo_gateway.bench.overload`):
normal readers, slow readers and clients that vanish mid-stream. Between rounds
it waits ``--idle-s`` (longer than the server's keep-alive, so that connections
the clients left are closed). Per round it counts served, shed (429/503 with a
Retry-After and an OpenAI error body) and failed requests, and times probe
requests sent every ``--probe-every-s`` during the load. At the end it checks
that the worker has no request in flight and no KV block in use.

It prints a table, writes JSON (``--json``) and plots RSS over time with the
rounds shaded (``--plot``). Example::

    python benchmarks/overload_memory.py --model /tmp/demo --rounds 3 --clients 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from dynamo_gateway.bench import procs  # noqa: E402
from dynamo_gateway.bench.overload import Mix, RoundResult, run_round, worker_gauges  # noqa: E402

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "overload_memory.json"
DEFAULT_PLOT = REPO_ROOT / "docs" / "images" / "overload_memory.png"
MIB = 1024 * 1024

log = procs.make_log("overload_memory")


@dataclass
class RSSSampler:
    """Samples one process's RSS from a thread, so a busy event loop does not skew it."""

    pid: int
    every_s: float
    t0: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, float]] = field(default_factory=list)  # (s since t0, MiB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss / MIB
            except psutil.NoSuchProcess:
                return
            self.samples.append((time.monotonic() - self.t0, rss))
            self._stop.wait(self.every_s)

    def now(self) -> float:
        """Seconds since the sampler started."""
        return time.monotonic() - self.t0

    def rss(self) -> float:
        """The RSS right now, in MiB."""
        import psutil

        return float(psutil.Process(self.pid).memory_info().rss / MIB)

    def peak(self, since: float, until: float) -> float:
        return max((m for t, m in self.samples if since <= t <= until), default=0.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def raise_fd_limit(need: int) -> None:
    """Lift the soft open-files limit towards the hard one (one socket per client)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < need:
        log(f"warning: open-files limit {want} is below the {need} this run needs")


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def round_report(
    i: int, result: RoundResult, start: float, end: float, sampler: RSSSampler, rss_after: float
) -> dict[str, Any]:
    t = result.tally
    probe_s = [p.latency_s for p in result.probes]
    kinds: dict[str, int] = {}
    for o in result.outcomes:
        kinds[o.kind.value] = kinds.get(o.kind.value, 0) + 1
    served_s = [o.latency_s for o in result.outcomes if o.status == 200]
    return {
        "round": i,
        "start_s": round(start, 2),
        "end_s": round(end, 2),
        "wall_s": round(result.wall_s, 2),
        "clients": result.clients,
        "kinds": kinds,
        **t.as_dict(),
        "served_latency_p50_s": round(_quantile(served_s, 0.5), 3),
        "served_latency_max_s": round(max(served_s, default=0.0), 3),
        "probes": len(result.probes),
        "probe_statuses": sorted({p.status for p in result.probes}),
        "probe_failed": sum(1 for p in result.probes if p.status not in (200, 429, 503)),
        "probe_latency_p50_s": round(statistics.median(probe_s), 3) if probe_s else None,
        "probe_latency_max_s": round(max(probe_s), 3) if probe_s else None,
        "rss_peak_mib": round(sampler.peak(start, end), 1),
        "rss_after_mib": round(rss_after, 1),
    }


def wait_idle(url: str, timeout: float) -> dict[str, list[float]]:
    """Wait until every worker reports 0 active requests and 0 KV blocks used."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = {
            name: worker_gauges(url, name)
            for name in ("worker_active_requests", "worker_kv_blocks_used")
        }
        if all(v == 0.0 for vals in gauges.values() for v in vals) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.25)


def plot(samples: list[tuple[float, float]], rounds: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([t for t, _ in samples], [m for _, m in samples], color="tab:blue", lw=1.2)
    for r in rounds:
        ax.axvspan(r["start_s"], r["end_s"], color="tab:orange", alpha=0.2, lw=0)
        label = f"round {r['round']}\n{r['served']} served\n{r['shed']} shed"
        ax.text(r["start_s"], 0.02, label, transform=ax.get_xaxis_transform(), fontsize=7)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frontend RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Gateway RSS over {len(rounds)} rounds of {rounds[0]['clients']} streams")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"plot written to {path}")


def print_table(report: dict[str, Any]) -> None:
    print(f"RSS idle before the load: {report['rss_idle_mib']:.1f} MiB")
    print(
        "| round | clients | served | shed | failed | probes (p50 / max s) "
        "| RSS peak | RSS after idle |"
    )
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in report["rounds"]:
        print(
            f"| {r['round']} | {r['clients']} | {r['served']} | {r['shed']} | {r['failed']} "
            f"| {r['probes']} ({r['probe_latency_p50_s']} / {r['probe_latency_max_s']}) "
            f"| {r['rss_peak_mib']:.1f} | {r['rss_after_mib']:.1f} |"
        )
    print(f"RSS at the end: {report['rss_end_mib']:.1f} MiB; worker gauges: {report['workers']}")


def serve_cmd(args: argparse.Namespace, model: Path, port: int) -> list[str]:
    cmd = [*procs.gateway_base_cmd(args.gateway_cmd), "serve", "--engine", "mocker"]
    cmd += ["--model", str(model), "--served-model-name", "demo", "--port", str(port)]
    cmd += ["--speedup", str(args.speedup), "--log-level", "warning"]
    if args.keep_alive is not None:
        cmd += ["--keep-alive", str(args.keep_alive)]
    return cmd + list(args.serve_arg)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = args.model
    if model is None:
        from dynamo_gateway.models.demo import build_demo_model

        model = workdir / "demo"
        build_demo_model(model)
    port = procs.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = serve_cmd(args, model, port)
    log(f"starting: {' '.join(cmd)}")
    log_path = workdir / "gateway.log"
    proc = procs.start_process(cmd, log_path, REPO_ROOT)

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited:\n{procs.log_tail(log_path)}")

    sampler = RSSSampler(proc.pid, args.sample_s)
    try:
        if not procs.poll_ready(url, 120, alive)[0]:
            raise RuntimeError(f"gateway not ready:\n{procs.log_tail(log_path)}")
        sampler.start()
        time.sleep(args.settle_s)
        idle = sampler.rss()
        log(f"ready; RSS idle {idle:.1f} MiB")
        mix = Mix(slow=args.slow, vanish=args.vanish, max_tokens=args.max_tokens)
        rounds = []
        for i in range(1, args.rounds + 1):
            log(f"round {i}/{args.rounds}: {args.clients} clients")
            start = sampler.now()
            result = asyncio.run(run_round(url, args.clients, mix, timeout=args.timeout))
            end = sampler.now()
            t = result.tally
            log(
                f"round {i} done in {result.wall_s:.1f} s: {t.served} served, {t.shed} shed, "
                f"{t.failed} failed {dict(t.failures)}; RSS {sampler.rss():.1f} MiB; "
                f"idling {args.idle_s:.0f} s"
            )
            time.sleep(args.idle_s)
            rss_after = sampler.rss()
            rounds.append(round_report(i, result, start, end, sampler, rss_after))
            log(f"round {i}: RSS after idle {rss_after:.1f} MiB")
        workers = wait_idle(url, 30)
        rss_end = sampler.rss()
    finally:
        sampler.stop()
        procs.signal_group(proc, 15)
        procs.wait_or_kill(proc, 20)
    return {
        "benchmark": "overload_memory",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "config": {
            "rounds": args.rounds,
            "clients": args.clients,
            "slow_fraction": args.slow,
            "vanish_fraction": args.vanish,
            "max_tokens": args.max_tokens,
            "speedup": args.speedup,
            "idle_s": args.idle_s,
            "keep_alive_s": args.keep_alive,
            "command": cmd,
        },
        "rss_idle_mib": round(idle, 1),
        "rounds": rounds,
        "rss_end_mib": round(rss_end, 1),
        "workers": workers,
        "rss_samples": [[round(t, 2), round(m, 1)] for t, m in sampler.samples],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: build a demo model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2000, help="concurrent streams per round")
    p.add_argument("--slow", type=float, default=0.2, help="fraction of slow readers")
    p.add_argument("--vanish", type=float, default=0.2, help="fraction that vanish mid-stream")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--speedup", type=float, default=1.0, help="mocker speedup")
    p.add_argument("--keep-alive", type=float, help="the server's --keep-alive (default its own)")
    p.add_argument("--idle-s", type=float, default=10.0, help="wait after each round")
    p.add_argument("--settle-s", type=float, default=3.0, help="wait before the idle sample")
    p.add_argument("--sample-s", type=float, default=0.2, help="RSS sampling period")
    p.add_argument("--timeout", type=float, default=120.0, help="per-client timeout")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument")
    p.add_argument("--gateway-cmd", help="how to run dynamo-gateway (default: the installed one)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = p.parse_args()
    raise_fd_limit(args.clients + 256)
    with tempfile.TemporaryDirectory(prefix="overload-memory-") as tmp:
        report = run(args, Path(tmp))
    print_table(report)
    procs.write_report(args.json, report, log)
    plot([(t, m) for t, m in report["rss_samples"]], report["rounds"], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
