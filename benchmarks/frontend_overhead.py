"""Frontend overhead benchmark: the gateway (mocker engine) versus the bare SSE floor.

For every ASGI server (hypercorn, and uvicorn if installed) and every target (the floor
server of :mod:`dynamo_gateway.bench.floor` and/or ``dynamo-gateway serve --engine mocker``)
this program:

1. starts the target as a subprocess on a free port and waits for ``GET /ready`` == 200;
2. warms it up with a short load-generator run;
3. runs the load generator (``python -m dynamo_gateway.bench.cli``, a separate process so
   the client's CPU is kept apart from the server's and is measurable) with ``--concurrency``
   streaming clients x ``--output-tokens`` tokens, ``--requests`` requests;
4. measures the CPU time (user + system) the server process tree consumed during that run
   and reports it per request.

It prints a markdown table and writes everything to ``--json``. Example::

    python benchmarks/frontend_overhead.py --targets floor
    python benchmarks/frontend_overhead.py --model /path/to/model --servers hypercorn,uvicorn
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from dynamo_gateway.bench import procs  # noqa: E402
from dynamo_gateway.bench.procs import free_port, gateway_base_cmd  # noqa: E402

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "frontend_overhead.json"
SERVED_MODEL_NAME = "bench"


log = procs.make_log("frontend_overhead")  # progress output on stderr


@dataclass
class Target:
    """A server process under test."""

    name: str  # "floor" or "gateway"
    server: str  # "hypercorn" or "uvicorn"
    cmd: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        log(f"starting {self.name} ({self.server}) on port {self.port}: {' '.join(self.cmd)}")
        # A new session so the whole tree (gateway workers included) can be stopped.
        self.proc = procs.start_process(self.cmd, self.log_path, REPO_ROOT)
        ready, _ = procs.poll_ready(self.url, timeout, self._check_alive)
        if ready:
            log(f"{self.name} ({self.server}) ready")
            return
        raise RuntimeError(
            f"{self.name} ({self.server}) not ready after {timeout:.0f}s:\n" + self.log_tail()
        )

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} ({self.server}) exited with {self.proc.returncode}:\n"
                + self.log_tail()
            )

    def cpu_seconds(self) -> float:
        """User + system CPU of the process tree (reaped descendants included)."""
        return procs.tree_cpu_seconds(self.proc)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        log(f"stopping {self.name} ({self.server})")
        procs.signal_group(proc, signal.SIGTERM)
        procs.wait_or_kill(proc, 15)

    def log_tail(self, n: int = 40) -> str:
        return procs.log_tail(self.log_path, n)


def make_target(name: str, server: str, args: argparse.Namespace, workdir: Path) -> Target:
    port = free_port()
    log_path = workdir / f"{name}-{server}.log"
    if name == "floor":
        cmd = [
            sys.executable,
            "-m",
            "dynamo_gateway.bench.floor",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--server",
            server,
        ]
    elif name == "gateway":
        cmd = [
            *gateway_base_cmd(args.gateway_cmd),
            "serve",
            "--engine",
            "mocker",
            "--model",
            str(args.model),
            "--workers",
            str(args.workers),
            "--speedup",
            f"{args.speedup:g}",
            "--port",
            str(port),
            "--served-model-name",
            SERVED_MODEL_NAME,
            "--server",
            server,
        ]
    else:
        raise ValueError(f"unknown target {name!r}")
    return Target(name, server, cmd, port, log_path)


def run_client(
    target: Target,
    args: argparse.Namespace,
    requests: int,
    json_path: Path | None,
    concurrency: int | None = None,
) -> tuple[dict[str, Any] | None, float, str]:
    """Run the load generator as a subprocess; returns (result JSON, its CPU s, stdout)."""
    return procs.run_load_client(
        target.url,
        model=SERVED_MODEL_NAME,
        concurrency=concurrency or args.concurrency,
        requests=requests,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        json_path=json_path,
        timeout=args.client_timeout,
        repo_root=REPO_ROOT,
    )


def measure(target: Target, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Warm up, then run the measured load and attribute server CPU to it."""
    warm = max(2 * args.concurrency, args.warmup_requests)
    log(f"warm-up: {warm} requests against {target.name} ({target.server})")
    run_client(target, args, warm, None)
    time.sleep(0.5)  # let the server settle (e.g. idle connections closed)
    out_json = workdir / f"bench-{target.name}-{target.server}.json"
    log(
        f"measuring: {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.output_tokens} output tokens against {target.name} ({target.server})"
    )
    cpu0 = target.cpu_seconds()
    t0 = time.perf_counter()
    result, client_proc_cpu, stdout = run_client(target, args, args.requests, out_json)
    wall = time.perf_counter() - t0
    cpu1 = target.cpu_seconds()
    assert result is not None
    server_cpu = cpu1 - cpu0
    ok = max(int(result["requests"]), 1)
    log(
        f"{target.name} ({target.server}): {result['req_per_s']:.1f} req/s, "
        f"{result['errors']} errors, server CPU {server_cpu:.2f}s"
    )
    if result["errors"]:
        log(f"errors: {result.get('error_samples')}")
    probe: dict[str, Any] | None = None
    if args.probe_requests > 0:
        # Under a saturating closed loop, TTFT is mostly queueing behind other requests, so
        # a faster-streaming target can show a *higher* TTFT. One request at a time shows
        # the per-request latency a frontend adds.
        log(f"latency probe: {args.probe_requests} requests at concurrency 1")
        probe_json = workdir / f"probe-{target.name}-{target.server}.json"
        probe, _, _ = run_client(target, args, args.probe_requests, probe_json, concurrency=1)
    return {
        "target": target.name,
        "server": target.server,
        "url": target.url,
        "bench": result,
        "server_cpu_s": server_cpu,
        "cpu_ms_per_req": 1000.0 * server_cpu / ok,
        "server_cpu_pct": 100.0 * server_cpu / wall if wall > 0 else 0.0,
        "client_process_cpu_s": client_proc_cpu,
        "client_wall_s": wall,
        "client_summary": stdout,
        "probe_c1": probe,
    }


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render(runs: list[dict[str, Any]], deltas: list[dict[str, Any]]) -> str:
    lines = [
        "| target | server | req/s | output tok/s | SSE events/s | TTFT p50 (ms) "
        "| TTFT p99 (ms) | ITL p50 (ms) | CPU-ms/req | errors | client CPU % "
        "| TTFT p50 @c=1 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        b = r["bench"]
        lines.append(
            f"| {r['target']} | {r['server']} | {_f(b['req_per_s'])} | "
            f"{_f(b['output_tok_per_s'], 0)} | {_f(b['events_per_s'], 0)} | "
            f"{_f(b['ttft_ms']['p50'], 2)} | {_f(b['ttft_ms']['p99'], 2)} | "
            f"{_f(b['itl_ms']['p50'], 3)} | {_f(r['cpu_ms_per_req'], 2)} | {b['errors']} | "
            f"{_f(b.get('client_cpu_pct'), 0)} | {_f(_probe_ttft(r), 2)} |"
        )
    if deltas:
        lines += [
            "",
            "| added vs floor | server | added TTFT p50 (ms) | added TTFT p99 (ms) "
            "| added CPU-ms/req | req/s ratio | added TTFT p50 @c=1 (ms) |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for d in deltas:
            lines.append(
                f"| {d['target']} | {d['server']} | {_f(d['added_ttft_p50_ms'], 2)} | "
                f"{_f(d['added_ttft_p99_ms'], 2)} | {_f(d['added_cpu_ms_per_req'], 2)} | "
                f"{_f(d['req_per_s_ratio'], 2)} | {_f(d['added_ttft_p50_c1_ms'], 2)} |"
            )
    return "\n".join(lines)


def _probe_ttft(run: dict[str, Any]) -> float | None:
    probe = run.get("probe_c1")
    return None if not probe else probe["ttft_ms"]["p50"]


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def compute_deltas(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per server: what each non-floor target adds on top of the floor."""
    floors = {r["server"]: r for r in runs if r["target"] == "floor"}
    deltas = []
    for r in runs:
        base = floors.get(r["server"])
        if r["target"] == "floor" or base is None:
            continue
        b, f = r["bench"], base["bench"]
        deltas.append(
            {
                "target": r["target"],
                "server": r["server"],
                "added_ttft_p50_ms": _sub(b["ttft_ms"]["p50"], f["ttft_ms"]["p50"]),
                "added_ttft_p99_ms": _sub(b["ttft_ms"]["p99"], f["ttft_ms"]["p99"]),
                "added_cpu_ms_per_req": r["cpu_ms_per_req"] - base["cpu_ms_per_req"],
                "added_ttft_p50_c1_ms": _sub(_probe_ttft(r), _probe_ttft(base)),
                "req_per_s_ratio": (
                    b["req_per_s"] / f["req_per_s"] if f["req_per_s"] > 0 else None
                ),
            }
        )
    return deltas


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_servers = ["hypercorn"]
    if importlib.util.find_spec("uvicorn") is not None:
        default_servers.append("uvicorn")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (required for gateway targets)")
    p.add_argument("--targets", default="floor,gateway", help="comma list: floor,gateway")
    p.add_argument("--servers", default=",".join(default_servers), help="hypercorn,uvicorn")
    procs.add_load_args(p, requests=2000, workers=1, workers_help="gateway workers", warmup=200)
    p.add_argument(
        "--probe-requests",
        type=int,
        default=200,
        help="extra run at concurrency 1 for unloaded TTFT (0 disables)",
    )
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--client-timeout", type=float, default=900.0)
    p.add_argument(
        "--gateway-cmd",
        help="command that runs the gateway CLI (default: dynamo-gateway, or its entry point)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = p.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    for t in args.target_list:
        if t not in ("floor", "gateway"):
            p.error(f"unknown target {t!r}")
    for s in args.server_list:
        if s not in ("hypercorn", "uvicorn"):
            p.error(f"unknown server {s!r}")
    if "gateway" in args.target_list and args.model is None:
        p.error("--model is required for the gateway target (or use --targets floor)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="frontend_overhead-") as tmp:
        workdir = Path(tmp)
        for server in args.server_list:
            for name in args.target_list:
                target = make_target(name, server, args, workdir)
                try:
                    target.start(args.startup_timeout)
                    runs.append(measure(target, args, workdir))
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    log(f"FAILED {name} ({server}): {exc}")
                    failures.append(f"{name} ({server}): {exc}")
                finally:
                    target.stop()
                time.sleep(1.0)  # let sockets and CPU settle between runs
    deltas = compute_deltas(runs)
    table = render(runs, deltas)
    print(table, flush=True)
    report = {
        "config": {
            **procs.load_config(args),
            "model": str(args.model) if args.model else None,
            "targets": args.target_list,
            "servers": args.server_list,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "runs": runs,
        "deltas": deltas,
        "failures": failures,
        "table_markdown": table,
    }
    procs.write_report(args.json, report, log)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
