"""Request ids, JSON logs and traces across a frontend and a worker process.

file:// discovery and the zmq:// event plane need no servers. Each process logs
JSON lines on stderr (its ready line is on stdout) and writes its spans to a
file of its own; the test reads both back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from dynamo_gateway.servers.process import terminate
from dynamo_gateway.testing import free_port

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
STREAM_TRACE = "5bf92f3577b34da6a3ce929d0e0e4737"


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    spans: Path

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"no {prefix!r} line:\n{self.out.read_text()}\n{self.err.read_text()}")

    def span_records(self) -> list[dict[str, Any]]:
        if not self.spans.exists():
            return []
        return [json.loads(line) for line in self.spans.read_text().splitlines()]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(name: str, *argv: str) -> Proc:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        spans = tmp_path / f"{name}-spans.jsonl"
        args = [*argv, "--log-format", "json", "--log-level", "debug", "--trace-file", str(spans)]
        with out.open("wb") as o, err.open("wb") as e:
            process = subprocess.Popen(
                [sys.executable, "-m", "dynamo_gateway.cli", *args], stdout=o, stderr=e
            )
        started.append(Proc(process, out, err, spans))
        return started[-1]

    yield start
    for proc in reversed(started):
        terminate(proc.process, 15)


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a process's stderr, each a JSON object with the required keys."""
    entries = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)  # a line that is not JSON fails here
        assert {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def test_request_id_logs_and_trace_cross_the_request_plane(
    spawn: Callable[..., Proc], demo_model: Path, tmp_path: Path
) -> None:
    runtime = ["--discovery", f"file://{tmp_path}/discovery", "--events", f"zmq://{tmp_path}/ev"]
    worker = spawn(
        "worker", "worker", "--engine", "mocker", "--model", str(demo_model),
        "--served-model-name", "demo", "--speedup", "50", *runtime,
    )  # fmt: skip
    worker_id = worker.wait_for("dynamo-gateway worker ").split()[2]
    port = free_port()
    frontend = spawn("frontend", "frontend", "--port", str(port), *runtime)
    frontend.wait_for("dynamo-gateway frontend ")
    url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: _ready(url), "the frontend never saw the worker")

    # The openai client: extra headers in, X-Request-Id and nvext back.
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="demo",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            extra_headers={
                "X-Request-Id": "cluster-req-1",
                "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
            },
            extra_body={"nvext": {"extra_fields": ["worker_id", "timing"]}},
        )
    assert raw.headers["x-request-id"] == "cluster-req-1"
    nvext = (raw.parse().model_extra or {})["nvext"]
    assert nvext["worker_id"]["decode_worker_id"] == worker_id
    assert 0 < nvext["timing"]["ttft_ms"] <= nvext["timing"]["total_time_ms"]

    # Streaming, without a client id: one is made up and returned.
    body = {"model": "demo", "prompt": "hi", "max_tokens": 5, "stream": True}
    headers = {"traceparent": f"00-{STREAM_TRACE}-{CLIENT_SPAN}-01"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        generated = resp.headers["x-request-id"]
        assert resp.read().endswith(b"data: [DONE]\n\n")
    assert len(generated) == 32

    # Spans: the worker's engine span is a child of the frontend's call span, in the
    # trace the client started.
    def traced(proc: Proc, trace: str, name: str) -> list[dict[str, Any]]:
        return [s for s in proc.span_records() if s["trace_id"] == trace and s["name"] == name]

    _wait_until(
        lambda: (
            bool(traced(frontend, STREAM_TRACE, "POST /v1/completions"))
            and bool(traced(worker, STREAM_TRACE, "engine.generate"))
        ),
        "spans never reached the files",
    )
    (server,) = traced(frontend, CLIENT_TRACE, "POST /v1/chat/completions")
    assert server["parent_span_id"] == CLIENT_SPAN and server["kind"] == "SERVER"
    assert server["service"] == "dynamo-gateway-frontend"
    assert server["attributes"]["dynamo.request_id"] == "cluster-req-1"
    (call,) = traced(frontend, CLIENT_TRACE, "worker_call")
    assert call["kind"] == "CLIENT" and call["attributes"]["dynamo.worker_id"] == worker_id
    (engine,) = traced(worker, CLIENT_TRACE, "engine.generate")
    assert engine["parent_span_id"] == call["span_id"]
    assert engine["service"] == "dynamo-gateway-worker"
    assert engine["attributes"]["dynamo.request_id"] == "cluster-req-1"
    assert engine["attributes"]["gen_ai.usage.output_tokens"] == 5
    assert [e["name"] for e in engine["events"]] == ["first_token"]
    (stream_engine,) = traced(worker, STREAM_TRACE, "engine.generate")
    assert stream_engine["attributes"]["dynamo.request_id"] == generated

    # Logs: every stderr line of both processes is JSON; the lines written while
    # serving the request carry its id (and trace id) in both processes.
    terminate(frontend.process, 15)
    terminate(worker.process, 30)
    front_logs, worker_logs = _json_lines(frontend.err), _json_lines(worker.err)
    mine = [e for e in worker_logs if e.get("request_id") == "cluster-req-1"]
    assert mine and all(e["trace_id"] == CLIENT_TRACE for e in mine)
    assert any(e.get("request_id") == generated for e in worker_logs)
    routed = [e for e in front_logs if "routed to" in e["message"]]
    assert {e.get("request_id") for e in routed} == {"cluster-req-1", generated}
    assert any(e["level"] == "INFO" and "request_id" not in e for e in worker_logs)
