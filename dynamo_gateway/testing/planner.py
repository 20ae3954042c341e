"""Client-side helpers for planner end-to-end tests: load, what the frontend routes
to, and the planner's own decisions read from its log.

`Load` holds a set number of completion requests in flight from client threads;
`live_workers` / `wait_for` read the frontend's ``/ready``; `drain_times` reads
the planner's log; `planner_toml` writes a config for mocker models that reacts
within seconds. Needs the dev extras (``httpx``), so the pytest plugin never
imports it: test modules do.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dynamo_gateway.testing.cluster import ClusterProcess

__all__ = [
    "MODEL_TOML",
    "PLANNER_TOML",
    "Load",
    "drain_times",
    "live_workers",
    "planner_toml",
    "wait_for",
]

# Reacts within a couple of seconds: 0.5 s intervals, a 4 s cool-down, 4 requests
# per worker as the target. Workers drain for up to 20 s on scale-down.
PLANNER_TOML = """
interval_s = 0.5
cooldown_s = 4
{budget}
[load]
target_requests = 4
up_intervals = 2
down_intervals = 4
{models}
"""

MODEL_TOML = """
[[models]]
name = "{name}"
path = "{path}"
engine = "mocker"
worker_args = ["--drain-timeout", "20"]
pools = {{ aggregated = {{ min = 1, max = {max} }} }}
"""


def planner_toml(
    model_path: Path, models: Mapping[str, int], budget: int | None = None, *, tail: str = ""
) -> str:
    """`PLANNER_TOML` over mocker models (name -> max workers) of `model_path`; `tail`
    (top-level keys, then tables) goes in before the models."""
    return PLANNER_TOML.format(
        budget=(f"budget = {budget}" if budget else "") + ("\n" + tail if tail else ""),
        models="".join(
            MODEL_TOML.format(name=name, path=model_path, max=top) for name, top in models.items()
        ),
    )


@dataclass
class Load:
    """Client threads, each keeping one completion request in flight at a time."""

    url: str
    model: str
    results: list[tuple[int, str]] = field(default_factory=list)  # (status, detail)
    _stops: list[threading.Event] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def set_users(self, n: int) -> None:
        while len(self._stops) < n:
            stop = threading.Event()
            thread = threading.Thread(target=self._user, args=(stop,), daemon=True)
            self._stops.append(stop)
            self._threads.append(thread)
            thread.start()
        while len(self._stops) > n:
            self._stops.pop().set()

    def _user(self, stop: threading.Event) -> None:
        body = {"model": self.model, "prompt": "hello " * 40, "max_tokens": 96,
                "ignore_eos": True}  # fmt: skip
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    resp = client.post(f"{self.url}/v1/completions", json=body)
                    ok = resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 96
                    self.results.append((resp.status_code, "" if ok else resp.text[:300]))
                except Exception as exc:  # a failed request, never a crash of the test
                    self.results.append((0, repr(exc)))

    def stop(self) -> None:
        self.set_users(0)
        for thread in self._threads:
            thread.join(60)

    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200 or r[1]]


def live_workers(frontend: ClusterProcess) -> dict[str, int]:
    """Live workers per model, as the frontend's ``/ready`` shows them ({} if it is down)."""
    try:
        with urllib.request.urlopen(f"{frontend.url}/ready", timeout=2) as resp:
            return dict(json.loads(resp.read())["models"])
    except urllib.error.HTTPError as exc:  # 503 while a model has no worker
        return dict(json.loads(exc.read()).get("models", {}))
    except (urllib.error.URLError, OSError):
        return {}


def wait_for(
    frontend: ClusterProcess, check: Callable[[dict[str, int]], bool], timeout: float, what: str,
    seen: list[dict[str, int]] | None = None,
) -> float:  # fmt: skip
    """Poll `live_workers` until `check` holds; returns the seconds it took (each poll
    is appended to `seen`), fails with `what` after `timeout`."""
    start = time.monotonic()
    now: dict[str, int] = {}
    while time.monotonic() - start < timeout:
        now = live_workers(frontend)
        if seen is not None:
            seen.append(now)
        if check(now):
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (workers now {now})")


def drain_times(log: str, pool: str) -> list[float]:
    """When the planner decided to drain one worker of `pool` (seconds, from its log);
    fails on a decision that drains more than one at a time."""
    times = []
    for line in log.splitlines():
        match = re.match(rf"(\S+ \S+) INFO .*planner: {re.escape(pool)} drain (\d+) ", line)
        if match is None:
            continue
        assert match[2] == "1", line  # max_down_step
        stamp = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
        times.append(stamp.timestamp())
    return times
