"""The TCP request plane (wire codec, worker server, remote client) and request migration.

Everything runs in this process over real TCP on 127.0.0.1 (port 0): no etcd, no
nats. Mocker engines where only the plumbing matters, the reference engine on
the demo model where greedy output must match exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dynamo_gateway.engines.base import Engine, EngineContext, KvEventSink
from dynamo_gateway.engines.mocker import MockerEngine
from dynamo_gateway.engines.reference.engine import ReferenceEngine
from dynamo_gateway.errors import EngineError, WorkerLostError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.preprocess import ChatTemplate, Tokenizer
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    LoadMetrics,
    TokenLogprob,
)
from dynamo_gateway.protocol.kv_events import KvEvent, KvSnapshot
from dynamo_gateway.router.base import RouteRequest, WorkerView
from dynamo_gateway.router.policies import RoundRobinRouter
from dynamo_gateway.runtime import remote as remote_module
from dynamo_gateway.runtime.discovery import WorkerRecord
from dynamo_gateway.runtime.pool import ModelPool
from dynamo_gateway.runtime.remote import RemoteWorker
from dynamo_gateway.runtime.rpc_server import RequestPlaneServer
from dynamo_gateway.runtime.wire import (
    HEADER,
    MAX_FRAME_BYTES,
    Call,
    Cancel,
    Fail,
    Frame,
    FrameCodec,
    FrameError,
    Out,
    Reply,
    Rpc,
    encode_result,
)
from dynamo_gateway.settings import load_settings
from dynamo_gateway.testing import collect, engine_request, free_port, tokens_of

VOCAB = 2048  # the demo model's


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def card(demo_model: Path) -> ModelCard:
    return ModelCard.load(demo_model, served_name="demo")


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, VOCAB) for _ in range(n)]


def greedy(rid: str, tokens: list[int], max_tokens: int, **sampling: Any) -> EngineRequest:
    """Greedy and EOS-blind: the output is a function of the prompt, of fixed length."""
    return engine_request(rid, tokens, max_tokens, temperature=0.0, ignore_eos=True, **sampling)


@contextlib.asynccontextmanager
async def mocker(
    card: ModelCard,
    *,
    speedup: float = 1e4,
    publish: KvEventSink | None = None,
    worker_id: str = "w0",
) -> AsyncIterator[MockerEngine]:
    """A started mocker; speedup 1 makes a decode step take about 8 ms."""
    settings = load_settings(None, mocker={"speedup": speedup}, cache={"num_kv_blocks": 1024})
    engine = MockerEngine(
        EngineContext(settings=settings, model=card, worker_id=worker_id, publish_kv_event=publish)
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


@contextlib.asynccontextmanager
async def reference(card: ModelCard, *, worker_id: str = "w0") -> AsyncIterator[ReferenceEngine]:
    """A started reference engine on CPU, one torch thread (CI has 2 cores)."""
    settings = load_settings(
        None, reference={"device": "cpu", "num_threads": 1}, cache={"num_kv_blocks": 256}
    )
    engine = ReferenceEngine(EngineContext(settings=settings, model=card, worker_id=worker_id))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.aclose()


@contextlib.asynccontextmanager
async def serving(engine: Engine) -> AsyncIterator[RequestPlaneServer]:
    server = RequestPlaneServer(engine, host="127.0.0.1", port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


def record(address: str, worker_id: str = "w0") -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, model="demo", model_path="", address=address)


@contextlib.asynccontextmanager
async def remote(
    address: str, *, worker_id: str = "w0", **kwargs: Any
) -> AsyncIterator[RemoteWorker]:
    worker = RemoteWorker(record(address, worker_id), **kwargs)
    try:
        yield worker
    finally:
        await worker.aclose()
        await asyncio.sleep(0.01)  # let the transports finish closing (no ResourceWarning)


@contextlib.asynccontextmanager
async def plane(
    engine: Engine, **kwargs: Any
) -> AsyncIterator[tuple[RequestPlaneServer, RemoteWorker]]:
    """`engine` served on a free port, and a `RemoteWorker` for it."""
    async with serving(engine) as server, remote(server.address, **kwargs) as worker:
        yield server, worker


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def drain(stream: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [out async for out in stream]


def abort_connections(server: RequestPlaneServer) -> None:
    """A worker crash as the frontend sees it: every connection drops at once."""
    for conn in list(server._conns):
        conn.abort()


def assert_one_finish(outs: Sequence[EngineOutput], reason: FinishReason) -> None:
    assert outs[-1].finish_reason is reason
    assert all(out.finish_reason is None for out in outs[:-1])


# -- 1. the wire codec -------------------------------------------------------------------


def sample_frames() -> list[Frame]:
    request = engine_request(
        "req-1", [1, 2, 3, 4], 7, temperature=0.5, seed=3, logprobs=2, resumed=[9, 8]
    )
    return [
        Call(1, request, 1.5),
        Call(2, engine_request("req-2", [5], 1)),
        Cancel(1),
        Rpc(3, "health"),
        Rpc(4, "kv_snapshot"),
        Out(2, EngineOutput(token_ids=[11, 12], cached_tokens=16)),
        Out(
            2,
            EngineOutput(
                token_ids=[13],
                finish_reason=FinishReason.LENGTH,
                logprobs=[TokenLogprob(13, -0.25, [(13, -0.25), (14, -1.5)])],
            ),
        ),
        Out(5, EngineOutput(token_ids=[], finish_reason=FinishReason.ERROR, error="boom")),
        Fail(6, "worker is draining", retryable=True),
        Fail(7, "bad request"),
        Reply(3),
        Reply(8, encode_result(LoadMetrics(active_requests=2, kv_blocks_total=64))),
        Reply(9, error="unknown method 'x'"),
    ]


def encode_all(frames: Sequence[Frame]) -> bytes:
    codec = FrameCodec()
    out = bytearray()
    for frame in frames:
        codec.encode(frame, out)
    return bytes(out)


def test_codec_round_trips_every_frame_kind() -> None:
    frames = sample_frames()
    assert {type(f) for f in frames} == {Call, Cancel, Rpc, Out, Fail, Reply}
    data = encode_all(frames)
    codec = FrameCodec()
    got = codec.feed(data)
    assert got == frames
    # A Reply's raw result decodes to what was encoded, and stays valid after more
    # bytes went through the codec (it must not point into a reused buffer).
    reply = got[11]
    assert isinstance(reply, Reply)
    assert codec.feed(data) == frames
    assert msgspec.msgpack.decode(reply.result, type=LoadMetrics) == LoadMetrics(
        active_requests=2, kv_blocks_total=64
    )
    assert codec.feed(b"") == []


def test_codec_reassembles_a_stream_cut_anywhere() -> None:
    frames = sample_frames()
    data = encode_all(frames)
    for cut in range(len(data) + 1):
        codec = FrameCodec()
        assert codec.feed(data[:cut]) + codec.feed(data[cut:]) == frames, cut
    codec = FrameCodec()
    one_by_one = [f for i in range(len(data)) for f in codec.feed(data[i : i + 1])]
    assert one_by_one == frames
    rng = random.Random(5)
    for _ in range(50):
        codec = FrameCodec()
        got: list[Frame] = []
        pos = 0
        while pos < len(data):
            step = rng.randint(1, 40)
            got += codec.feed(data[pos : pos + step])
            pos += step
        assert got == frames


def test_codec_rejects_oversize_frames_and_garbage() -> None:
    # An announced size over the limit fails at once, before any body arrives.
    with pytest.raises(FrameError, match="exceeds"):
        FrameCodec().feed(HEADER.pack(MAX_FRAME_BYTES + 1))
    # Exactly the limit is allowed: the codec waits for the body.
    assert FrameCodec().feed(HEADER.pack(MAX_FRAME_BYTES)) == []
    body = b"\xff\xfe\xfd"
    with pytest.raises(FrameError, match="undecodable"):
        FrameCodec().feed(HEADER.pack(len(body)) + body)
    with pytest.raises(FrameError):  # an empty frame
        FrameCodec().feed(HEADER.pack(0))
    unknown_tag = msgspec.msgpack.encode([99, 1])
    with pytest.raises(FrameError):
        FrameCodec().feed(HEADER.pack(len(unknown_tag)) + unknown_tag)
    wrong_fields = msgspec.msgpack.encode([2, "not a stream id"])  # Cancel(stream: int)
    with pytest.raises(FrameError):
        FrameCodec().feed(HEADER.pack(len(wrong_fields)) + wrong_fields)
    # Garbage after a good frame, fed in pieces, is still caught.
    codec = FrameCodec()
    good = encode_all([Cancel(1)])
    assert codec.feed(good + HEADER.pack(len(body))) == [Cancel(1)]
    with pytest.raises(FrameError):
        codec.feed(body)


# -- 2. streaming equals the engine ------------------------------------------------------


async def test_remote_stream_equals_direct_reference_output(card: ModelCard) -> None:
    async with asyncio.timeout(20), reference(card) as engine, plane(engine) as (_, worker):
        p = prompt(1, 40)
        fresh = await drain(worker.generate(greedy("r1", p, 24)))
        direct = await collect(engine, greedy("d1", p, 24))  # now a prefix-cache hit
        assert len(tokens_of(direct)) == 24
        assert tokens_of(fresh) == tokens_of(direct)
        assert_one_finish(fresh, FinishReason.LENGTH)
        assert not fresh[0].cached_tokens  # nothing was cached yet
        # The repeated prompt is a cache hit remotely as it is directly.
        again = await drain(worker.generate(greedy("r2", p, 24)))
        assert direct[0].cached_tokens
        assert again[0].cached_tokens == direct[0].cached_tokens
        assert tokens_of(again) == tokens_of(direct)
        assert_one_finish(again, FinishReason.LENGTH)

        # Logprobs travel intact.
        q = prompt(2, 12)
        lp_remote = await drain(worker.generate(greedy("r3", q, 10, logprobs=3)))
        lp_direct = await collect(engine, greedy("d3", q, 10, logprobs=3))
        assert tokens_of(lp_remote) == tokens_of(lp_direct)
        remote_lps = [lp for out in lp_remote for lp in out.logprobs or []]
        direct_lps = [lp for out in lp_direct for lp in out.logprobs or []]
        assert [lp.token_id for lp in remote_lps] == tokens_of(lp_remote)
        assert len(remote_lps) == len(direct_lps) == 10
        for a, b in zip(remote_lps, direct_lps, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert len(a.top) == 3
        # Without logprobs requested, none arrive.
        assert all(out.logprobs is None for out in fresh)
        assert worker.streams == 0
        await eventually(lambda: engine.load().active_requests == 0)


# -- 3. many streams on few connections --------------------------------------------------


@pytest.mark.parametrize("connections", [1, 2])
async def test_many_concurrent_streams(card: ModelCard, connections: int) -> None:
    async with (
        asyncio.timeout(20),
        mocker(card, speedup=1e3) as engine,
        plane(engine, connections=connections) as (server, worker),
    ):
        prompts = [prompt(100 + i, 8 + i % 13) for i in range(50)]
        lengths = [5 + i % 17 for i in range(50)]
        expected = [
            tokens_of(await collect(engine, greedy(f"d{i}", p, n)))
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
        # The first stream opens connection 1; with a pool of 2 the rest open the second.
        first = worker.generate(greedy("r0", prompts[0], lengths[0]))
        head = await anext(first)

        async def rest_of_first() -> list[int]:
            return head.token_ids + tokens_of(await drain(first))

        async def run(i: int) -> list[int]:
            outs = await drain(worker.generate(greedy(f"r{i}", prompts[i], lengths[i])))
            assert outs[-1].finish_reason is FinishReason.LENGTH
            return tokens_of(outs)

        got = await asyncio.gather(rest_of_first(), *(run(i) for i in range(1, 50)))
        assert got == expected
        assert len(worker._conns) == connections
        assert worker.streams == 0
        assert all(conn.load == 0 for conn in worker._conns)
        await eventually(lambda: server.inflight == 0)
        assert server.requests_served == 50
        assert engine.load().active_requests == 0


# -- 4. cancellation -----------------------------------------------------------------------


async def test_closing_the_stream_aborts_the_request(card: ModelCard) -> None:
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=1.0) as engine,
        plane(engine) as (server, worker),
    ):
        stream = worker.generate(greedy("r1", prompt(3, 20), 5000))
        first = await anext(stream)
        assert first.finish_reason is None
        assert engine.load().active_requests == 1
        assert server.inflight == 1
        started = time.monotonic()
        await stream.aclose()
        assert worker.streams == 0
        await eventually(lambda: engine.load().active_requests == 0 and server.inflight == 0, 2.0)
        assert time.monotonic() - started < 1.0
        assert engine.load().kv_blocks_used == 0
        # A Cancel frame, not a dropped connection: the connection carries on.
        assert len(worker._conns) == 1 and not worker._conns[0].closed
        outs = await drain(worker.generate(greedy("r2", prompt(4, 10), 3)))
        assert len(tokens_of(outs)) == 3
        assert len(worker._conns) == 1


# -- 5. the per-request deadline -----------------------------------------------------------


async def test_request_deadline_is_a_non_retryable_error(card: ModelCard) -> None:
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=1.0) as engine,
        plane(engine, request_timeout_s=0.2) as (server, worker),
    ):
        started = time.monotonic()
        outs: list[EngineOutput] = []
        with pytest.raises(EngineError, match="deadline") as info:
            async for out in worker.generate(greedy("r1", prompt(5, 20), 5000)):
                outs.append(out)
        assert not isinstance(info.value, WorkerLostError)
        assert 0.15 < time.monotonic() - started < 2.0
        assert outs and all(out.finish_reason is None for out in outs)
        await eventually(lambda: engine.load().active_requests == 0 and server.inflight == 0)
        assert worker.streams == 0
        # A short request within the deadline is unaffected.
        short = await drain(worker.generate(greedy("r2", prompt(6, 10), 3)))
        assert len(tokens_of(short)) == 3


# -- 6. drain --------------------------------------------------------------------------------


async def test_drain_refuses_new_calls_and_finishes_running_ones(card: ModelCard) -> None:
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=2.0) as engine,
        plane(engine) as (server, worker),
    ):
        running = worker.generate(greedy("r1", prompt(7, 16), 40))
        head = await anext(running)
        server.begin_drain()
        with pytest.raises(WorkerLostError, match="draining"):
            await drain(worker.generate(greedy("r2", prompt(8, 16), 4)))
        assert not await server.wait_idle(0.01)  # r1 still runs
        rest = await drain(running)
        assert len(head.token_ids + tokens_of(rest)) == 40
        assert rest[-1].finish_reason is FinishReason.LENGTH
        assert await server.wait_idle(2.0)
        assert server.inflight == 0
        assert worker.streams == 0
        # RPCs still answer while draining (the frontend's health checks).
        await worker.check_health()


# -- 7. stop -----------------------------------------------------------------------------------


async def test_stopping_the_engine_mid_stream_is_retryable(card: ModelCard) -> None:
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=1.0) as engine,
        plane(engine) as (server, worker),
    ):
        stream = worker.generate(greedy("r1", prompt(9, 20), 5000))
        outs = [await anext(stream)]
        server.stopping = True
        await engine.aclose()
        with pytest.raises(WorkerLostError, match="shutting down"):
            async for out in stream:
                outs.append(out)
        assert all(out.finish_reason is None for out in outs)
        await eventually(lambda: server.inflight == 0)
        assert worker.streams == 0
        # A call after the engine stopped is refused retryably too.
        with pytest.raises(WorkerLostError):
            await drain(worker.generate(greedy("r2", prompt(10, 8), 4)))


async def test_a_stopped_engine_without_shutdown_is_not_retryable(card: ModelCard) -> None:
    async with (
        asyncio.timeout(10),
        mocker(card) as engine,
        plane(engine) as (_, worker),
    ):
        await engine.aclose()
        with pytest.raises(EngineError, match="stopped") as info:
            await drain(worker.generate(greedy("r1", prompt(11, 8), 4)))
        assert not isinstance(info.value, WorkerLostError)


class RejectingEngine:
    """Rejects every request as soon as `generate()` is called (no async generator)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        raise EngineError(f"request {request.request_id} rejected")

    def load(self) -> LoadMetrics:
        return self.engine.load()

    async def check_health(self) -> None:
        await self.engine.check_health()


async def test_an_engine_rejecting_in_generate_fails_the_stream(card: ModelCard) -> None:
    # Regression: generate() raising before returning an iterator left the stream
    # unanswered (the client hung) and the server's inflight count stuck above 0.
    async with asyncio.timeout(10), mocker(card) as engine:
        server = RequestPlaneServer(RejectingEngine(engine))  # type: ignore[arg-type]
        await server.start()
        try:
            async with remote(server.address) as worker:
                with pytest.raises(EngineError, match="r1 rejected") as info:
                    await drain(worker.generate(greedy("r1", prompt(12, 8), 4)))
                assert not isinstance(info.value, WorkerLostError)
                assert await server.wait_idle(1.0)
                assert server.inflight == 0 and worker.streams == 0
                await worker.check_health()
        finally:
            await server.aclose()


# -- 8. lost connections -----------------------------------------------------------------------


async def test_dropped_connections_end_streams_with_worker_lost(card: ModelCard) -> None:
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=1.0) as engine,
        plane(engine) as (server, worker),
    ):
        streams = [worker.generate(greedy(f"r{i}", prompt(20 + i, 12), 5000)) for i in range(3)]
        for stream in streams:
            await anext(stream)
        assert server.inflight == 3
        abort_connections(server)
        for stream in streams:
            with pytest.raises(WorkerLostError, match="lost the connection"):
                await drain(stream)
        assert worker.streams == 0
        # The worker notices too: every stream is aborted in the engine.
        await eventually(lambda: engine.load().active_requests == 0 and server.inflight == 0)
        # The listener is still up: the next call opens a fresh connection.
        outs = await drain(worker.generate(greedy("r9", prompt(29, 8), 3)))
        assert len(tokens_of(outs)) == 3
        await worker.check_health()


async def test_server_aclose_mid_stream_is_worker_lost(card: ModelCard) -> None:
    # aclose() with the engine still running lets streams go on for up to 2 s, then
    # closes the connections: the frontend sees a lost worker, never a normal finish.
    async with asyncio.timeout(10), mocker(card, speedup=1.0) as engine:
        server = RequestPlaneServer(engine)
        await server.start()
        try:
            async with remote(server.address) as worker:
                stream = worker.generate(greedy("r1", prompt(30, 12), 5000))
                await anext(stream)
                closing = asyncio.create_task(server.aclose())
                with pytest.raises(WorkerLostError):
                    await drain(stream)
                await closing
                await eventually(lambda: engine.load().active_requests == 0)
                assert server.inflight == 0
                # Nothing listens any more.
                with pytest.raises(WorkerLostError, match="cannot connect"):
                    await drain(worker.generate(greedy("r2", prompt(31, 8), 3)))
        finally:
            await server.aclose()


async def test_closing_the_remote_worker_ends_its_streams(card: ModelCard) -> None:
    # What the frontend does when discovery drops a worker: open streams end with
    # WorkerLostError (so they migrate) and the worker aborts them.
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=1.0) as engine,
        plane(engine) as (server, worker),
    ):
        stream = worker.generate(greedy("r1", prompt(32, 12), 5000))
        await anext(stream)
        await worker.aclose()
        with pytest.raises(WorkerLostError):
            await drain(stream)
        with pytest.raises(WorkerLostError, match="removed"):
            await drain(worker.generate(greedy("r2", prompt(33, 8), 3)))
        await eventually(lambda: engine.load().active_requests == 0 and server.inflight == 0)


async def test_nothing_listening_is_worker_lost_quickly() -> None:
    async with asyncio.timeout(5), remote(f"tcp://127.0.0.1:{free_port()}") as worker:
        started = time.monotonic()
        with pytest.raises(WorkerLostError, match="cannot connect"):
            await drain(worker.generate(greedy("r1", [5, 6, 7], 3)))
        with pytest.raises(WorkerLostError):
            await worker.check_health()
        assert time.monotonic() - started < 1.0
        assert worker.streams == 0


async def test_garbage_from_a_peer_closes_only_its_connection(card: ModelCard) -> None:
    async with asyncio.timeout(10), mocker(card) as engine, plane(engine) as (server, worker):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(HEADER.pack(3) + b"\xff\xfe\xfd")
            await writer.drain()
            assert await reader.read() == b""  # the worker hung up
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        outs = await drain(worker.generate(greedy("r1", prompt(40, 8), 4)))
        assert len(tokens_of(outs)) == 4


# -- 9. RPCs ---------------------------------------------------------------------------------


async def test_rpcs(card: ModelCard) -> None:
    events: list[KvEvent] = []
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=1e3, publish=events.append) as engine,
        plane(engine) as (_, worker),
    ):
        await worker.check_health()
        load = await worker.fetch_load()
        assert isinstance(load, LoadMetrics)
        assert load == engine.load()
        assert load.kv_blocks_total == 1024

        shared = prompt(50, 64)
        await asyncio.gather(
            *(drain(worker.generate(greedy(f"r{i}", [*shared, i + 5], 8))) for i in range(3))
        )
        snapshot = await worker.kv_snapshot()
        assert isinstance(snapshot, KvSnapshot)
        assert snapshot == engine.kv_snapshot()
        assert snapshot.blocks and snapshot.event_id == engine.last_kv_event_id > 0
        assert snapshot.worker_id == "w0"

        reply = await worker._rpc("no-such-method")
        assert reply.error is not None and "no-such-method" in reply.error

        await engine.aclose()
        with pytest.raises(EngineError, match="stopped") as info:
            await worker.check_health()
        assert not isinstance(info.value, WorkerLostError)


async def test_kv_snapshot_of_an_engine_without_events_is_an_error(card: ModelCard) -> None:
    async with asyncio.timeout(10), mocker(card) as engine, plane(engine) as (_, worker):
        with pytest.raises(EngineError, match="no KV events"):
            await worker.kv_snapshot()
        await worker.check_health()  # the connection survives a failed RPC


# -- 10. migration through the pool -------------------------------------------------------------


class RecordingRoundRobin(RoundRobinRouter):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def on_routed(self, request: RouteRequest, worker: WorkerView) -> None:
        self.calls.append(("routed", worker.worker_id))

    def on_first_token(self, request_id: str) -> None:
        self.calls.append(("first", request_id))

    def on_finished(self, request_id: str) -> None:
        self.calls.append(("finished", request_id))


@pytest.mark.parametrize("kill", ["stop", "crash"])
@pytest.mark.parametrize("migration_limit", [1, 0])
async def test_migration_resumes_on_another_worker(
    card: ModelCard, kill: str, migration_limit: int
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(asyncio.timeout(30))
        engines: dict[str, ReferenceEngine] = {}
        servers: dict[str, RequestPlaneServer] = {}
        router = RecordingRoundRobin()
        pool = ModelPool(
            card,
            Tokenizer.from_dir(card.path),
            ChatTemplate.from_dir(card.path),
            router,
            migration_limit=migration_limit,
        )
        for wid in ("a", "b"):
            engines[wid] = await stack.enter_async_context(reference(card, worker_id=wid))
            servers[wid] = await stack.enter_async_context(serving(engines[wid]))
            pool.add(await stack.enter_async_context(remote(servers[wid].address, worker_id=wid)))

        p = prompt(60, 30)
        expected = tokens_of(await collect(engines["b"], greedy("expected", p, 64)))
        assert len(expected) == 64

        routed = pool.route(RouteRequest("m1", p), greedy("m1", p, 64))
        first_worker = routed.worker.record.worker_id
        got: list[int] = []
        outputs: list[EngineOutput] = []
        lost: WorkerLostError | None = None
        try:
            async for out in routed.outputs:
                if not outputs:
                    routed.first_token()
                outputs.append(out)
                got.extend(out.token_ids)
                if len(outputs) == 10:
                    assert len(got) < 64, "the request finished before the worker was killed"
                    if kill == "stop":
                        servers[first_worker].stopping = True
                        await engines[first_worker].aclose()
                    else:
                        abort_connections(servers[first_worker])
        except WorkerLostError as exc:
            lost = exc
        finally:
            await routed.close()

        other = "b" if first_worker == "a" else "a"
        if migration_limit:
            assert lost is None
            assert got == expected
            assert outputs[-1].finish_reason is FinishReason.LENGTH
            assert routed.migrations == 1 and pool.migrations == 1
            assert routed.worker.record.worker_id == other
            assert router.calls == [
                ("routed", first_worker),
                ("first", "m1"),
                ("finished", "m1"),
                ("routed", other),
                ("finished", "m1"),
            ]
        else:
            assert lost is not None
            assert 10 <= len(got) < 64
            assert got == expected[: len(got)]
            assert routed.migrations == 0 and pool.migrations == 0
            assert router.calls == [("routed", first_worker), ("first", "m1"), ("finished", "m1")]
        assert all(w.view.inflight == 0 for w in pool.workers.values())
        assert all(w.streams == 0 for w in pool.workers.values())  # type: ignore[attr-defined]

        def idle() -> bool:
            return all(
                engines[w].load().active_requests == 0 and servers[w].inflight == 0
                for w in ("a", "b")
            )

        await eventually(idle)


# -- 11. coalescing on the client ----------------------------------------------------------------


async def test_slow_consumer_gets_coalesced_deltas(
    card: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed: list[EngineOutput] = []
    push = remote_module._Stream.push

    def counting_push(self: Any, out: EngineOutput) -> None:
        pushed.append(out)
        push(self, out)

    monkeypatch.setattr(remote_module._Stream, "push", counting_push)
    async with (
        asyncio.timeout(10),
        mocker(card, speedup=8.0) as engine,  # about 1 ms per decode step
        plane(engine) as (_, worker),
    ):
        p = prompt(70, 20)
        expected = tokens_of(await collect(engine, greedy("d1", p, 60, logprobs=1)))
        # A repeated prompt, so the first output reports a cache hit to keep.
        direct_again = await collect(engine, greedy("d2", p, 60, logprobs=1))
        outs = []
        async for out in worker.generate(greedy("r1", p, 60, logprobs=1)):
            outs.append(out)
            await asyncio.sleep(0.03)
        assert tokens_of(outs) == expected
        assert len(outs) < len(pushed) <= 60
        assert len(outs) < 60
        assert_one_finish(outs, FinishReason.LENGTH)
        assert outs[0].cached_tokens == direct_again[0].cached_tokens
        assert direct_again[0].cached_tokens
        for out in outs:
            assert out.logprobs is not None
            assert [lp.token_id for lp in out.logprobs] == out.token_ids
        assert sum(len(out.logprobs or []) for out in outs) == 60
        assert worker.streams == 0
