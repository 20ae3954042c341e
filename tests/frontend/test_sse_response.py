"""`SSEResponse` when its producer fails: an OpenAI-shaped error, never a bare 500."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from dynamo_gateway.errors import EngineError, InvalidRequestError, WorkerLostError
from dynamo_gateway.frontend.http import DisconnectWatcher, SSEResponse

Emit = Callable[[bytes], Awaitable[None]]


def _app(fail: Exception, after_first_chunk: bool) -> Callable[[Scope, Receive, Send], Any]:
    closed: list[int] = []

    async def producer(emit: Emit) -> None:
        if after_first_chunk:
            await emit(b'data: {"choices": []}\n\n')
        raise fail

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        watcher = DisconnectWatcher(receive)
        response = SSEResponse(producer, watcher, lambda _gone, status: closed.append(status))
        await response(scope, receive, send)
        assert closed == [response.status_code]

    return app


async def _get(app: Callable[[Scope, Receive, Send], Any]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.get("/")


@pytest.mark.parametrize(
    ("fail", "status", "code"),
    [
        (InvalidRequestError("bad grammar"), 400, None),
        (WorkerLostError("worker w1 lost, no other worker"), 500, "worker_lost"),
        (EngineError("the engine failed"), 500, "engine_error"),
        (RuntimeError("a bug"), 500, "internal_error"),
        # A socket error from the server's side (not the client's send): not a
        # vanished client, whose stream ends quietly, but a server error.
        (ConnectionRefusedError(111, "Connection refused"), 500, "internal_error"),
    ],
    ids=["client", "worker-lost", "engine", "bug", "oserror"],
)
async def test_failure_before_the_first_chunk_is_an_openai_error(
    fail: Exception, status: int, code: str | None
) -> None:
    resp = await _get(_app(fail, after_first_chunk=False))
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == code and error["message"]
    assert "a bug" not in error["message"]  # a bug's text stays in the log


@pytest.mark.parametrize(
    "fail", [EngineError("the engine failed"), RuntimeError("a bug")], ids=["engine", "bug"]
)
async def test_failure_mid_stream_ends_it_with_an_error_event(fail: Exception) -> None:
    resp = await _get(_app(fail, after_first_chunk=True))
    assert resp.status_code == 200  # already sent
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[0] == {"choices": []}
    assert events[-1]["error"]["type"] in ("engine_error", "server_error")
