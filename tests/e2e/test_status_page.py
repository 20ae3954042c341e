"""The live status page in a real headless Chromium (Playwright), against a real
cluster: worker and frontend processes over ``file://`` discovery and ``zmq://``
events (no servers), and a dry-run `dynamo-gateway planner` beside them.

The page must show the model and its workers, follow a worker joining and one
leaving without a reload, list an error and the planner's decisions, and load
nothing but its own origin. It is skipped without Debian's ``chromium`` or the
``playwright`` package (CI installs both, and fails instead of skipping:
``DYNAMO_GATEWAY_REQUIRE_SERVERS=1``).

The screenshot goes to the test's tmp dir; ``DYNAMO_GATEWAY_STATUS_SCREENSHOT=
docs/images/status.png`` also writes it there (how the docs image is made).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from dynamo_gateway.testing import Cluster
from dynamo_gateway.testing.fixtures import REQUIRE_SERVERS_ENV

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

MakeCluster = Callable[[str, str], Cluster]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT_ENV = "DYNAMO_GATEWAY_STATUS_SCREENSHOT"
WAIT_MS = 20_000


@pytest.fixture
def browser() -> Iterator[Browser]:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Debian's chromium at {CHROMIUM} (apt install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        reason = "needs " + " and ".join(missing)
        if os.environ.get(REQUIRE_SERVERS_ENV) == "1":
            pytest.fail(f"{REQUIRE_SERVERS_ENV}=1: {reason}", pytrace=False)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def worker_row(worker_id: str) -> str:
    return f'[data-model="demo"] tr[data-worker="{worker_id}"]'


def hold_stream(url: str, prompt: str, release: threading.Event) -> int:
    """Stream a long completion until `release` is set (then hang up); lines read."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": 1500, "ignore_eos": True,
            "stream": True}  # fmt: skip
    lines = 0
    with (
        httpx.Client(base_url=url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as resp,
    ):
        for _ in resp.iter_lines():
            lines += 1
            if release.is_set():
                break
    return lines


def test_status_page_follows_the_cluster_live(
    cluster: MakeCluster, browser: Browser, tmp_path: Path, demo_model: Path
) -> None:
    c = cluster(f"file://{tmp_path}/discovery", f"zmq://{tmp_path}/events")
    # Real-time mocker (about 6 ms a token) and a small KV cache: held requests show.
    worker_args = ("--num-kv-blocks", "256", "--lease-ttl", "2")
    first = c.worker(*worker_args)
    fe = c.frontend("--router", "kv")
    c.wait_workers(fe, 1)

    page: Page = browser.new_page(viewport={"width": 1200, "height": 800})
    requested: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(f"{fe.url}/status")
    page.wait_for_selector(worker_row(first.worker_id), timeout=WAIT_MS)
    assert page.text_content('[data-model="demo"] h2') == "demo"
    page.evaluate("window.loadedOnce = true")  # gone if the page were reloaded

    # A worker joins: its row appears without a reload.
    second = c.worker(*worker_args)
    page.wait_for_selector(worker_row(second.worker_id), timeout=WAIT_MS)
    assert page.text_content("#n-workers") == "2"

    # Traffic with a shared prefix, and an error.
    prompt = "the status page shows the prefix hit rate of this prompt " * 4
    with httpx.Client(base_url=fe.url, timeout=60) as client:
        for _ in range(6):
            body = {"model": "demo", "prompt": prompt, "max_tokens": 8}
            resp = client.post("/v1/completions", json=body)
            assert resp.status_code == 200, (resp.text, c.logs())
        body = {"model": "no-such-model", "prompt": "hi", "max_tokens": 8}
        assert client.post("/v1/completions", json=body).status_code == 404
    error = page.wait_for_selector('#errors tr.error:has-text("no-such-model")', timeout=WAIT_MS)
    assert error is not None and "404" in (error.text_content() or "")
    # Polled by selector, not wait_for_function: the page's CSP forbids eval.
    page.wait_for_selector("#n-requests:text-is('7')", timeout=WAIT_MS)

    # Requests held in flight: load and KV usage on the workers.
    release = threading.Event()
    pool = ThreadPoolExecutor(4)
    held = [pool.submit(hold_stream, fe.url, f"{i} {prompt}", release) for i in range(4)]
    page.wait_for_selector("#n-inflight:text-is('4')", timeout=WAIT_MS)

    # The planner (dry run, min 3 workers) wants one more and says so on the event plane.
    c.planner(
        "--model", str(demo_model), "--served-model-name", "demo", "--engine", "mocker",
        "--min-workers", "3", "--interval", "0.5", "--dry-run",
    )  # fmt: skip
    decision = page.wait_for_selector(
        '#decisions tr.decision:has-text("demo/aggregated")', timeout=WAIT_MS
    )
    assert decision is not None and "2 \u2192 3 (dry run)" in (decision.text_content() or "")
    facts = page.text_content('[data-model="demo"] .facts') or ""
    assert "prefix hit rate" in facts and "router kv" in facts, facts

    shot = tmp_path / "status.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])

    release.set()
    assert all(h.result(timeout=30) > 1 for h in held)
    pool.shutdown()

    # The worker leaves (SIGTERM: drain, deregister): its row goes, still no reload.
    second.stop()
    page.wait_for_selector(worker_row(second.worker_id), state="detached", timeout=WAIT_MS)
    assert page.is_visible(worker_row(first.worker_id))
    assert page.evaluate("window.loadedOnce") is True
    assert int(page.evaluate("document.body.dataset.polls")) >= 3
    assert "live" in (page.get_attribute("#conn", "class") or "")

    assert problems == []
    assert requested and all(url.startswith(fe.url + "/") for url in requested), requested
