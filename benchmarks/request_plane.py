"""Request-plane benchmark: the embedded gateway versus frontend + workers over TCP.

Modes:

* ``embedded``: ``dynamo-gateway serve --engine mocker --workers W`` (frontend and W mocker
  engines in one process, engines called in-process);
* ``distributed``: W ``dynamo-gateway worker --engine mocker`` processes plus one
  ``dynamo-gateway frontend`` process, with file discovery and zmq events in a temp
  directory; the frontend streams from the workers over the TCP request plane
  (length-prefixed msgpack frames);
* ``distributed-etcd-nats`` (only with ``--etcd`` and/or ``--nats``): the same with etcd
  discovery and/or NATS events (servers started by this program).

For every mode (alternating the order ``--repeat`` times) it starts the servers on free
ports, waits for ``GET /ready`` == 200 with all workers known, warms up, then runs the load
generator (``python -m dynamo_gateway.bench.cli``, a separate process so its CPU is kept
apart) with ``--concurrency`` streaming clients x ``--output-tokens`` tokens (ignore_eos),
``--requests`` requests, and measures the CPU time of every server process (frontend and
workers separately). The mocker runs ``--speedup`` times faster than its timing model so
the engine is not the bottleneck: what is measured is the gateway and its request plane.

It prints a markdown table (medians over the repeats) and writes every raw number to
``--json``. Example::

    python benchmarks/request_plane.py --repeat 3
    python benchmarks/request_plane.py --requests 64 --concurrency 4 --output-tokens 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from dynamo_gateway.bench import procs  # noqa: E402
from dynamo_gateway.bench.procs import free_port, gateway_base_cmd  # noqa: E402
from dynamo_gateway.servers.process import ServerProcess  # noqa: E402

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "request_plane.json"
SERVED_MODEL_NAME = "bench"
TARGET_RATIO = 0.75  # the goal: distributed keeps >= 75% of embedded throughput


log = procs.make_log("request_plane")  # progress output on stderr


def subprocess_env() -> dict[str, str]:
    """Environment for children: the checkout importable, unbuffered output."""
    return procs.subprocess_env(REPO_ROOT)


# -- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    """One server process (its own session, so its whole tree can be signalled)."""

    role: str  # "embedded", "frontend" or "worker"
    name: str
    cmd: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        log(f"starting {self.name}: {' '.join(self.cmd)}")
        self.popen = procs.start_process(
            self.cmd, self.log_path, REPO_ROOT, stdin=subprocess.DEVNULL
        )

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}"
            )

    def cpu_seconds(self) -> float:
        """User + system CPU of the process tree (reaped descendants included)."""
        return procs.tree_cpu_seconds(self.popen)

    def signal(self, sig: int) -> None:
        if self.popen is not None and self.popen.poll() is None:
            procs.signal_group(self.popen, sig)

    def wait(self, timeout: float) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        procs.wait_or_kill(
            self.popen,
            timeout,
            on_timeout=lambda: log(f"{self.name} did not stop in {timeout:.0f}s: killing it"),
        )

    def log_tail(self, n: int = 40) -> str:
        return procs.log_tail(self.log_path, n)


@dataclass
class Deployment:
    """The server processes of one mode, reached through one HTTP port."""

    mode: str
    port: int
    procs: list[Proc]
    workers: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        # Workers first: the frontend finds them through discovery.
        for p in self.procs:
            p.start()
        ready, body = procs.poll_ready(
            self.url, timeout, self._check_alive, accept=self._all_workers_known
        )
        if ready:
            log(f"{self.mode} ready: {body.decode(errors='replace')}")
            return
        tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in self.procs)
        raise RuntimeError(
            f"{self.mode} not ready after {timeout:.0f}s (last /ready: {body!r}):\n{tails}"
        )

    def _check_alive(self) -> None:
        for p in self.procs:
            p.check_alive()

    def _all_workers_known(self, body: bytes) -> bool:
        try:
            models = json.loads(body).get("models", {})
        except (ValueError, AttributeError):
            return False
        return int(models.get(SERVED_MODEL_NAME, 0)) >= self.workers

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.procs:
            out[p.role] = out.get(p.role, 0.0) + p.cpu_seconds()
        return out

    def stop(self) -> None:
        # Frontend first (so it does not chase vanishing workers), then the workers.
        order = sorted(self.procs, key=lambda p: p.role != "frontend")
        for p in order:
            if p.popen is not None and p.popen.poll() is None:
                log(f"stopping {p.name}")
            p.signal(signal.SIGTERM)
            if p.role == "frontend":
                p.wait(15)
        for p in order:
            p.wait(15)


def make_deployment(
    mode: str,
    args: argparse.Namespace,
    workdir: Path,
    run_tag: str,
    planes: dict[str, str],
) -> Deployment:
    gw = gateway_base_cmd(args.gateway_cmd)
    port = free_port()
    model = ["--model", str(args.model), "--served-model-name", SERVED_MODEL_NAME]
    speedup = ["--speedup", f"{args.speedup:g}"]
    log_level = ["--log-level", args.log_level]
    if mode == "embedded":
        cmd = [
            *gw,
            "serve",
            *log_level,
            "--engine",
            "mocker",
            *model,
            *speedup,
            "--workers",
            str(args.workers),
            "--port",
            str(port),
        ]
        procs = [Proc("embedded", "embedded", cmd, workdir / f"{run_tag}-embedded.log")]
        return Deployment(mode, port, procs, args.workers)
    if mode == "distributed":
        discovery = f"file://{workdir / f'{run_tag}-discovery'}"
        events = f"zmq://{workdir / f'{run_tag}-events'}"
    else:  # distributed-etcd-nats: whichever of the two servers was asked for
        discovery = planes.get("discovery") or f"file://{workdir / f'{run_tag}-discovery'}"
        events = planes.get("events") or f"zmq://{workdir / f'{run_tag}-events'}"
    plane = ["--discovery", discovery, "--events", events]
    procs = [
        Proc(
            "worker",
            f"{mode} worker {i}",
            [*gw, "worker", *log_level, "--engine", "mocker", *model, *speedup, *plane],
            workdir / f"{run_tag}-worker{i}.log",
        )
        for i in range(args.workers)
    ]
    frontend_cmd = [*gw, "frontend", *log_level, *plane, "--port", str(port)]
    if args.frontend_prefix:
        # e.g. "python -m cProfile -o /tmp/f.prof -m dynamo_gateway.cli"
        frontend_cmd = [*args.frontend_prefix.split(), "frontend", *log_level, *plane]
        frontend_cmd += ["--port", str(port)]
    procs.append(Proc("frontend", f"{mode} frontend", frontend_cmd, workdir / f"{run_tag}-fe.log"))
    return Deployment(mode, port, procs, args.workers, {"discovery": discovery, "events": events})


# -- load --------------------------------------------------------------------------------


def run_client(
    dep: Deployment,
    args: argparse.Namespace,
    requests: int,
    json_path: Path | None,
) -> tuple[dict[str, Any] | None, float, str]:
    """Run the load generator as a subprocess; returns (result JSON, its CPU s, stdout)."""
    return procs.run_load_client(
        dep.url,
        model=SERVED_MODEL_NAME,
        concurrency=args.concurrency,
        requests=requests,
        input_tokens=args.input_tokens,
        output_tokens=args.output_tokens,
        json_path=json_path,
        timeout=args.client_timeout,
        repo_root=REPO_ROOT,
    )


def measure(dep: Deployment, args: argparse.Namespace, workdir: Path, run_tag: str) -> dict:
    """Warm up, then run the measured load and attribute server CPU to it by role."""
    warm = max(2 * args.concurrency, args.warmup_requests)
    log(f"warm-up: {warm} requests against {dep.mode}")
    run_client(dep, args, warm, None)
    time.sleep(0.5)  # let the servers settle
    out_json = workdir / f"{run_tag}-bench.json"
    log(
        f"measuring {dep.mode}: {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.output_tokens} output tokens"
    )
    load_before = os.getloadavg()[0]
    busy0 = _machine_busy_s()
    cpu0 = dep.cpu_by_role()
    t0 = time.perf_counter()
    result, client_proc_cpu, stdout = run_client(dep, args, args.requests, out_json)
    wall = time.perf_counter() - t0
    cpu1 = dep.cpu_by_role()
    assert result is not None
    for p in dep.procs:
        p.check_alive()
    cpu = {role: cpu1.get(role, 0.0) - cpu0.get(role, 0.0) for role in cpu1}
    # Other work on the machine skews a run: keep the load average to spot that.
    load_after = os.getloadavg()[0]
    other_cpu = _machine_busy_s() - busy0 - total_cpu_of(cpu) - client_proc_cpu
    ok = max(int(result["requests"]), 1)
    total_cpu = sum(cpu.values())
    log(
        f"{dep.mode}: {result['req_per_s']:.1f} req/s, {result['output_tok_per_s']:,.0f} tok/s, "
        f"TTFT p50 {result['ttft_ms']['p50']:.1f} ms, {result['errors']} errors, "
        f"server CPU {total_cpu:.2f}s ({', '.join(f'{k} {v:.2f}s' for k, v in cpu.items())})"
    )
    if result["errors"]:
        log(f"errors: {result.get('error_samples')}")
    return {
        "mode": dep.mode,
        "url": dep.url,
        "details": dep.details,
        "bench": result,
        "server_cpu_s": cpu,
        "server_cpu_total_s": total_cpu,
        "cpu_ms_per_req": {role: 1000.0 * v / ok for role, v in cpu.items()},
        "cpu_ms_per_req_total": 1000.0 * total_cpu / ok,
        "server_cpu_pct": 100.0 * total_cpu / wall if wall > 0 else 0.0,
        "client_process_cpu_s": client_proc_cpu,
        "client_wall_s": wall,
        "client_summary": stdout,
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load_after,
        # CPU the rest of the machine used meanwhile (neither servers nor load generator):
        # well above 0 means the run competed with other work.
        "other_cpu_s": other_cpu,
        "other_cpu_pct": 100.0 * other_cpu / wall if wall > 0 else 0.0,
    }


def total_cpu_of(cpu: dict[str, float]) -> float:
    return sum(cpu.values())


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot."""
    t = psutil.cpu_times()
    return (
        t.user
        + t.system
        + getattr(t, "nice", 0.0)
        + getattr(t, "irq", 0.0)
        + getattr(t, "softirq", 0.0)
    )


# -- summary -----------------------------------------------------------------------------


def metrics_of(run: dict[str, Any]) -> dict[str, float]:
    b = run["bench"]
    cpu = run["cpu_ms_per_req"]
    return {
        "req_per_s": b["req_per_s"],
        "output_tok_per_s": b["output_tok_per_s"],
        "ttft_p50_ms": b["ttft_ms"]["p50"],
        "ttft_p99_ms": b["ttft_ms"]["p99"],
        "itl_p50_ms": b["itl_ms"]["p50"],
        "errors": float(b["errors"]),
        # The gateway coalesces token deltas that queue up into one SSE event.
        "tokens_per_event": b["output_tokens"] / b["events"] if b["events"] else None,
        # Embedded: the one process does both jobs; it is reported as the frontend.
        "cpu_ms_per_req_frontend": cpu.get("frontend", cpu.get("embedded", 0.0)),
        "cpu_ms_per_req_workers": cpu.get("worker", 0.0),
        "cpu_ms_per_req_total": run["cpu_ms_per_req_total"],
        "server_cpu_pct": run["server_cpu_pct"],
    }


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarize(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, Any]]:
    """Per mode: the median of every metric over the repeats (and the raw values)."""
    out: dict[str, dict[str, Any]] = {}
    for mode in modes:
        mine = [metrics_of(r) for r in runs if r["mode"] == mode]
        if not mine:
            continue
        out[mode] = {
            "n": len(mine),
            "median": {k: _median([m[k] for m in mine]) for k in mine[0]},
            "values": {k: [m[k] for m in mine] for k in mine[0]},
        }
    return out


def compare(summary: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every distributed mode against embedded: ratios and added latency (of the medians),
    plus the same ratio per round (both modes measured back to back)."""
    base = summary.get("embedded")
    if base is None:
        return []
    out = []
    for mode, s in summary.items():
        if mode == "embedded":
            continue
        b, d = base["median"], s["median"]
        per_round = []
        rounds = sorted({r["round"] for r in runs})
        for rnd in rounds:
            e = [r for r in runs if r["round"] == rnd and r["mode"] == "embedded"]
            x = [r for r in runs if r["round"] == rnd and r["mode"] == mode]
            if e and x and e[0]["bench"]["req_per_s"] > 0:
                per_round.append(x[0]["bench"]["req_per_s"] / e[0]["bench"]["req_per_s"])
        ratio = _ratio(d["req_per_s"], b["req_per_s"])
        out.append(
            {
                "mode": mode,
                "req_per_s_ratio": ratio,
                "output_tok_per_s_ratio": _ratio(d["output_tok_per_s"], b["output_tok_per_s"]),
                "req_per_s_ratio_per_round": per_round,
                "req_per_s_ratio_per_round_median": _median(list(per_round)),
                "added_ttft_p50_ms": _sub(d["ttft_p50_ms"], b["ttft_p50_ms"]),
                "added_ttft_p99_ms": _sub(d["ttft_p99_ms"], b["ttft_p99_ms"]),
                "added_itl_p50_ms": _sub(d["itl_p50_ms"], b["itl_p50_ms"]),
                "added_cpu_ms_per_req_total": _sub(
                    d["cpu_ms_per_req_total"], b["cpu_ms_per_req_total"]
                ),
                "target_ratio": TARGET_RATIO,
                "meets_target": ratio is not None and ratio >= TARGET_RATIO,
            }
        )
    return out


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def render(
    summary: dict[str, dict[str, Any]], comparisons: list[dict[str, Any]], runs: list[dict]
) -> str:
    lines = [
        "| mode | runs | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
        "| CPU-ms/req frontend | CPU-ms/req workers | CPU-ms/req total | tok/SSE event "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, s in summary.items():
        m = s["median"]
        lines.append(
            f"| {mode} | {s['n']} | {_f(m['req_per_s'])} | {_f(m['output_tok_per_s'], 0)} | "
            f"{_f(m['ttft_p50_ms'], 1)} | {_f(m['ttft_p99_ms'], 1)} | {_f(m['itl_p50_ms'], 3)} | "
            f"{_f(m['cpu_ms_per_req_frontend'], 2)} | {_f(m['cpu_ms_per_req_workers'], 2)} | "
            f"{_f(m['cpu_ms_per_req_total'], 2)} | {_f(m['tokens_per_event'], 1)} | "
            f"{sum(s['values']['errors']):.0f} |"
        )
    if comparisons:
        lines += [
            "",
            "| vs embedded | req/s ratio | tok/s ratio | req/s ratio per round "
            "| added TTFT p50 (ms) | added TTFT p99 (ms) | added CPU-ms/req "
            f"| ratio >= {TARGET_RATIO} |",
            "|---|---:|---:|---|---:|---:|---:|---|",
        ]
        for c in comparisons:
            per_round = ", ".join(f"{x:.2f}" for x in c["req_per_s_ratio_per_round"])
            lines.append(
                f"| {c['mode']} | {_f(c['req_per_s_ratio'], 2)} | "
                f"{_f(c['output_tok_per_s_ratio'], 2)} | {per_round or '-'} | "
                f"{_f(c['added_ttft_p50_ms'], 1)} | {_f(c['added_ttft_p99_ms'], 1)} | "
                f"{_f(c['added_cpu_ms_per_req_total'], 2)} | "
                f"{'yes' if c['meets_target'] else 'NO'} |"
            )
    if len(runs) > len(summary):
        lines += [
            "",
            "| round | mode | req/s | tok/s | TTFT p50 (ms) | TTFT p99 (ms) | CPU-ms/req "
            "| other CPU % | load 1m after |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            m = metrics_of(r)
            lines.append(
                f"| {r['round']} | {r['mode']} | {_f(m['req_per_s'])} | "
                f"{_f(m['output_tok_per_s'], 0)} | {_f(m['ttft_p50_ms'], 1)} | "
                f"{_f(m['ttft_p99_ms'], 1)} | {_f(m['cpu_ms_per_req_total'], 2)} | "
                f"{_f(r['other_cpu_pct'], 0)} | {_f(r['loadavg_1m_after'], 2)} |"
            )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", type=Path, help="model directory (default: a demo model built in a temp dir)"
    )
    p.add_argument("--modes", default="embedded,distributed", help="comma list")
    p.add_argument("--etcd", action="store_true", help="add a mode with etcd discovery")
    p.add_argument("--nats", action="store_true", help="add a mode with NATS events")
    p.add_argument("--repeat", type=int, default=1, help="rounds (modes alternate)")
    procs.add_load_args(p, requests=1280, workers=2, workers_help="mocker workers", warmup=256)
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--client-timeout", type=float, default=900.0)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--gateway-cmd",
        help="command that runs the gateway CLI (default: dynamo-gateway, or its entry point)",
    )
    p.add_argument(
        "--frontend-prefix",
        help="command that runs the CLI for the distributed frontend only, e.g. "
        "'python -m cProfile -o /tmp/fe.prof -m dynamo_gateway.cli' (for profiling)",
    )
    p.add_argument("--keep-logs", type=Path, help="copy server logs into this directory")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.mode_list:
        if m not in ("embedded", "distributed"):
            p.error(f"unknown mode {m!r} (embedded, distributed; --etcd/--nats add another)")
    if args.etcd or args.nats:
        args.mode_list.append("distributed-etcd-nats")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def build_demo_model(args: argparse.Namespace, workdir: Path) -> Path:
    path = workdir / "demo-model"
    log(f"building the demo model in {path}")
    subprocess.run(
        [*gateway_base_cmd(args.gateway_cmd), "demo-model", str(path)],
        env=subprocess_env(),
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    planes: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="request_plane-")))
        if args.model is None:
            args.model = build_demo_model(args, workdir)
        servers: list[tuple[str, ServerProcess]] = []
        if args.etcd:
            from dynamo_gateway.servers.etcd import EtcdServer

            servers.append(("discovery", EtcdServer(workdir / "etcd")))
        if args.nats:
            from dynamo_gateway.servers.nats import NatsServer

            servers.append(("events", NatsServer(workdir / "nats")))
        for plane, server in servers:
            server.start()
            stack.callback(server.stop)
            planes[plane] = server.url
            log(f"{server.name} at {server.url}")
        for rnd in range(args.repeat):
            # Alternate the order so drift (thermal, neighbours) does not favour one mode.
            order = args.mode_list if rnd % 2 == 0 else list(reversed(args.mode_list))
            for mode in order:
                tag = f"r{rnd}-{mode}"
                dep = make_deployment(mode, args, workdir, tag, planes)
                try:
                    dep.start(args.startup_timeout)
                    run = measure(dep, args, workdir, tag)
                    run["round"] = rnd
                    runs.append(run)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    log(f"FAILED {mode} (round {rnd}): {exc}")
                    failures.append(f"{mode} (round {rnd}): {exc}")
                finally:
                    dep.stop()
                time.sleep(1.0)  # let sockets and CPU settle between runs
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for f in workdir.glob("*.log"):
                shutil.copy(f, args.keep_logs / f.name)
    summary = summarize(runs, args.mode_list)
    comparisons = compare(summary, runs)
    table = render(summary, comparisons, runs)
    print(table, flush=True)
    report = {
        "config": {
            "modes": args.mode_list,
            "repeat": args.repeat,
            **procs.load_config(args),
            "warmup_requests": max(2 * args.concurrency, args.warmup_requests),
            "model": str(args.model),
            "planes": planes,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "code": _git_state(),
        "summary": summary,
        "comparisons": comparisons,
        "runs": runs,
        "failures": failures,
        "table_markdown": table,
    }
    procs.write_report(args.json, report, log)
    return 1 if failures else 0


def _git_state() -> dict[str, Any]:
    """The checkout measured: commit and locally modified files (read-only git calls)."""

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "dynamo_gateway")
    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": status.splitlines() if status else [],
    }


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


if __name__ == "__main__":
    sys.exit(main())
