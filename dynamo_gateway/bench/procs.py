"""Helpers the benchmark programs in ``benchmarks/`` share: server processes and the load.

Each benchmark starts servers as subprocesses (each in a session of its own, so
the whole process tree can be signalled), waits for ``GET /ready``, runs the
load generator (``python -m dynamo_gateway.bench.cli``) as a separate process,
and accounts the CPU time of the server process trees (with psutil, a dev
dependency) and of the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynamo_gateway.bench.httpclient import fetch


def make_log(prefix: str) -> Callable[[str], None]:
    """A progress logger: ``[<prefix> HH:MM:SS] msg`` on stderr (stdout stays the result)."""

    def log(msg: str) -> None:
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the tiny reuse race is acceptable here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def subprocess_env(repo_root: Path) -> dict[str, str]:
    """Environment for children: the checkout at `repo_root` importable, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def gateway_base_cmd(override: str | None) -> list[str]:
    """How to invoke the ``dynamo-gateway`` command."""
    if override:
        return override.split()
    exe = shutil.which("dynamo-gateway") or str(Path(sys.executable).parent / "dynamo-gateway")
    if Path(exe).exists():
        return [exe]
    # Not installed as a console script: call the entry point the script would call.
    code = "import sys; from dynamo_gateway.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code]


def start_process(
    cmd: list[str], log_path: Path, repo_root: Path, *, stdin: int | None = None
) -> subprocess.Popen[bytes]:
    """Start `cmd` in `repo_root` in a new session, its output written to `log_path`."""
    with log_path.open("wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=subprocess_env(repo_root),
            cwd=repo_root,
            start_new_session=True,
        )


def tree_cpu_seconds(popen: subprocess.Popen[bytes] | None) -> float:
    """User + system CPU of the process tree (reaped descendants included)."""
    import psutil  # a dev dependency; imported here so that benchmarks without it load

    if popen is None:
        return 0.0
    try:
        root = psutil.Process(popen.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the process group (session) of `popen`, if it still exists."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, sig)


def wait_or_kill(
    popen: subprocess.Popen[bytes],
    timeout: float,
    on_timeout: Callable[[], None] | None = None,
) -> None:
    """Wait `timeout` s for `popen` to exit, then SIGKILL its group and wait 15 s more."""
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if on_timeout is not None:
            on_timeout()
        signal_group(popen, signal.SIGKILL)
        popen.wait(timeout=15)


def log_tail(path: Path, n: int = 40) -> str:
    """The last `n` lines of the log file at `path` ("" if unreadable)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def poll_ready(
    url: str,
    timeout: float,
    check_alive: Callable[[], None],
    accept: Callable[[bytes], bool] | None = None,
) -> tuple[bool, bytes]:
    """Poll ``GET <url>/ready`` every 0.25 s until it answers 200 (and `accept(body)`).

    `check_alive` runs before every try (it raises if a server died). Returns
    whether the server got ready within `timeout` s, and the last body received.
    """
    deadline = time.monotonic() + timeout
    body = b""
    while time.monotonic() < deadline:
        check_alive()
        with contextlib.suppress(OSError, TimeoutError, ConnectionError):
            status, body = asyncio.run(fetch(f"{url}/ready", timeout=2.0))
            if status == 200 and (accept is None or accept(body)):
                return True, body
        time.sleep(0.25)
    return False, body


def run_load_client(
    url: str,
    *,
    model: str,
    concurrency: int,
    requests: int,
    input_tokens: int,
    output_tokens: int,
    json_path: Path | None,
    timeout: float,
    repo_root: Path,
) -> tuple[dict[str, Any] | None, float, str]:
    """Run the load generator as a subprocess; returns (result JSON, its CPU s, stdout)."""
    cmd = [
        sys.executable,
        "-m",
        "dynamo_gateway.bench.cli",
        "--url",
        url,
        "--model",
        model,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--input-tokens",
        str(input_tokens),
        "--output-tokens",
        str(output_tokens),
        "--no-progress",
    ]
    if json_path is not None:
        cmd += ["--json", str(json_path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        cmd,
        env=subprocess_env(repo_root),
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] | None = (
        json.loads(json_path.read_text()) if json_path is not None else None
    )
    return result, cpu, done.stdout


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write `report` as indented JSON to `path`, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_report(path: Path, report: dict[str, Any], log: Callable[[str], None]) -> None:
    """`write_json`, then say where the results went."""
    write_json(path, report)
    log(f"results written to {path}")


def add_load_args(
    p: argparse.ArgumentParser, *, requests: int, workers: int, workers_help: str, warmup: int
) -> None:
    """The load options both server benchmarks take (``--requests`` ... ``--warmup-requests``)."""
    p.add_argument("--requests", type=int, default=requests)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=100)
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--speedup", type=float, default=1000.0, help="mocker speedup")
    p.add_argument("--workers", type=int, default=workers, help=workers_help)
    p.add_argument("--warmup-requests", type=int, default=warmup)


def load_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options of `add_load_args` (but the warm-up) for a report's ``config``."""
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "output_tokens": args.output_tokens,
        "input_tokens": args.input_tokens,
        "speedup": args.speedup,
        "workers": args.workers,
    }
