"""Event planes: one contract for memory://, zmq:// and nats://, then what only the
remote ones do (other processes, killed publishers, server restarts).

ZMQ and NATS subscriptions take a moment to reach the publisher ("slow
joiner"), so the tests first publish markers until every subscription has seen
one, and only then check order and content.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Generic, TypeVar

import msgspec
import pytest

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.protocol.engine import LoadMetrics
from dynamo_gateway.protocol.kv_events import BlockRemoved, BlockStored, KvEvent
from dynamo_gateway.runtime.events import (
    EventPlane,
    LoadReport,
    MemoryEventPlane,
    kv_events_topic,
    load_topic,
)
from dynamo_gateway.runtime.nats_events import NatsEventPlane, nats_subject, parse_nats_url
from dynamo_gateway.runtime.zmq_events import ZmqEventPlane
from dynamo_gateway.servers.nats import NatsServer
from dynamo_gateway.settings import load_settings
from dynamo_gateway.testing import free_port

T = TypeVar("T", bound=msgspec.Struct)

MODEL = "org/Model-1.5B v2"  # dots, a slash and a space
WAIT_S = 10.0


class Collector(Generic[T]):
    """Reads one subscription into `items` in a task, until the plane closes it."""

    def __init__(self, plane: EventPlane, topic: str, type: type[T]) -> None:
        self.topic = topic
        self.items: list[T] = []
        self.task = asyncio.create_task(self._run(plane.subscribe(topic, type)))

    async def _run(self, messages: AsyncIterator[T]) -> None:
        async for message in messages:
            self.items.append(message)

    async def wait_until(self, done: Callable[[list[T]], bool], timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.items):
            if self.task.done():
                self.task.result()  # raises what the subscription raised
                raise AssertionError(f"subscription to {self.topic!r} ended early")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out on {self.topic!r}; got {self.items[-5:]}")
            await asyncio.sleep(0.01)

    async def ended(self, timeout: float = WAIT_S) -> None:
        await asyncio.wait_for(self.task, timeout)

    async def cancel(self) -> None:
        self.task.cancel()
        with suppress(asyncio.CancelledError):
            await self.task


def kv(worker: str, event_id: int) -> KvEvent:
    data = (
        BlockStored(block_hashes=[event_id], parent_block_hash=None, token_ids=[1, 2], block_size=2)
        if event_id % 2 == 0
        else BlockRemoved(block_hashes=[event_id])
    )
    return KvEvent(worker_id=worker, event_id=event_id, data=data)


def load(worker: str, active: int = 0) -> LoadReport:
    return LoadReport(worker_id=worker, metrics=LoadMetrics(active_requests=active))


async def until_seen(
    publish: Callable[[], None], collectors: list[Collector[T]], timeout: float = WAIT_S
) -> None:
    """Publish (markers) every 20 ms until each collector has something."""
    deadline = time.monotonic() + timeout
    while not all(c.items for c in collectors):
        assert time.monotonic() < deadline, "subscriptions never saw the markers"
        publish()
        await asyncio.sleep(0.02)


async def poll(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# -- the contract, for every backend ----------------------------------------------------------

PlanePair = Callable[[], Awaitable[tuple[EventPlane, EventPlane]]]


@pytest.fixture(params=["memory", "zmq", "nats"])
async def plane_pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[EventPlane, EventPlane]]:
    """(publisher, subscriber): two planes on one backend, as two processes would hold."""
    planes: list[EventPlane]
    if request.param == "memory":
        memory = MemoryEventPlane()  # one process: both sides share the plane
        planes = [memory, memory]
    elif request.param == "zmq":
        planes = [ZmqEventPlane(tmp_path / "ev"), ZmqEventPlane(tmp_path / "ev")]
    else:
        server: NatsServer = request.getfixturevalue("nats_server")
        planes = [NatsEventPlane.from_url(server.url), NatsEventPlane.from_url(server.url)]
    for plane in planes:
        await plane.start()
    yield planes[0], planes[1]
    for plane in planes:
        await plane.aclose()


async def test_contract(plane_pair: tuple[EventPlane, EventPlane]) -> None:
    pub, sub = plane_pair
    kv_a = Collector(sub, kv_events_topic(MODEL), KvEvent)
    load_b = Collector(sub, load_topic(MODEL), LoadReport)
    load_m = Collector(sub, load_topic("m"), LoadReport)
    load_m2 = Collector(sub, load_topic("m2"), LoadReport)
    odd = Collector(sub, kv_events_topic("a.b *>\n\x00é"), KvEvent)
    everyone = [kv_a, load_b, load_m, load_m2, odd]

    def markers() -> None:
        pub.publish(kv_events_topic(MODEL), kv("sync", 0))
        pub.publish(load_topic(MODEL), load("sync"))
        pub.publish(load_topic("m"), load("m"))
        pub.publish(load_topic("m2"), load("m2"))
        pub.publish(kv_events_topic("a.b *>\n\x00é"), kv("odd", 0))

    await until_seen(markers, everyone)

    # Per-publisher order; a message of the wrong type in between is skipped.
    n = 300
    for i in range(n):
        pub.publish(kv_events_topic(MODEL), kv("w1", i))
        if i == n // 2:
            pub.publish(kv_events_topic(MODEL), load("not-a-kv-event"))
        pub.publish(load_topic(MODEL), load("w1", i))
    pub.publish(load_topic("m"), load("m", 1))
    pub.publish(load_topic("m2"), load("m2", 1))
    await kv_a.wait_until(lambda items: sum(e.worker_id == "w1" for e in items) == n)
    await load_b.wait_until(lambda items: sum(r.worker_id == "w1" for r in items) == n)
    await load_m.wait_until(lambda items: items[-1].metrics.active_requests == 1)
    await load_m2.wait_until(lambda items: items[-1].metrics.active_requests == 1)

    assert [e for e in kv_a.items if e.worker_id == "w1"] == [kv("w1", i) for i in range(n)]
    assert {e.worker_id for e in kv_a.items} == {"sync", "w1"}
    assert all(isinstance(e, KvEvent) for e in kv_a.items)
    assert [r.metrics.active_requests for r in load_b.items if r.worker_id == "w1"] == list(
        range(n)
    )
    # Topics are isolated, including a model name that prefixes another.
    assert {r.worker_id for r in load_m.items} == {"m"}
    assert {r.worker_id for r in load_m2.items} == {"m2"}
    assert {e.worker_id for e in odd.items} == {"odd"}

    # aclose() ends every subscription (the fixture closes pub too; closing twice is fine).
    await sub.aclose()
    for collector in everyone:
        await collector.ended()


# -- plugin registration and URLs ---------------------------------------------------------------


def test_backends_are_registered_by_scheme(tmp_path: Path) -> None:
    registry = load_plugins(entry_points=False).registry
    settings = load_settings()
    assert {"memory", "zmq", "nats"} <= set(registry.event_planes.names())
    zmq_plane = registry.event_planes.get("zmq")(f"zmq://{tmp_path}/ev", settings)
    assert isinstance(zmq_plane, ZmqEventPlane) and zmq_plane.directory == tmp_path / "ev"
    nats_plane = registry.event_planes.get("nats")("nats://127.0.0.1:4222/prod.eu", settings)
    assert isinstance(nats_plane, NatsEventPlane)
    assert nats_plane.servers == ["nats://127.0.0.1:4222"] and nats_plane.namespace == "prod.eu"
    for bad in ("zmq://relative", "zmq://host/abs", "zmq:///abs?x=1"):
        with pytest.raises(ConfigError):
            registry.event_planes.get("zmq")(bad, settings)
    for bad in ("nats://", "nats://h:notaport", "nats://h:4222/bad ns", "nats://h:4222/a..b"):
        with pytest.raises(ConfigError):
            registry.event_planes.get("nats")(bad, settings)


def test_nats_url_and_subjects() -> None:
    assert parse_nats_url("nats://a:1,b:2") == (["nats://a:1", "nats://b:2"], "dynamo-gateway")
    subjects = {
        nats_subject("ns", topic)
        for topic in ("load.m", "load.m2", "load.m.2", "load", "x", "load.", "kv_events.m", "a b.c")
    }
    assert len(subjects) == 8
    for subject in subjects:
        assert " " not in subject and "*" not in subject and ">" not in subject
    assert nats_subject("ns", kv_events_topic(MODEL)).startswith("ns.kv_events.x")


def test_zmq_directory_too_long(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="too long"):
        ZmqEventPlane(tmp_path / ("d" * 120))


# -- zmq: real processes ------------------------------------------------------------------------

PUBLISHER = """
import asyncio, sys
from pathlib import Path
from dynamo_gateway.protocol.kv_events import AllBlocksCleared, KvEvent
from dynamo_gateway.runtime.events import kv_events_topic
from dynamo_gateway.runtime.zmq_events import ZmqEventPlane

async def main(directory, worker):
    plane = ZmqEventPlane(Path(directory))
    await plane.start()
    print(plane.socket_path, flush=True)
    event_id = 0
    while True:  # until killed
        plane.publish(kv_events_topic("m"), KvEvent(worker_id=worker, event_id=event_id,
                                                    data=AllBlocksCleared()))
        event_id += 1
        await asyncio.sleep(0.005)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _start_publisher(directory: Path, worker: str) -> tuple[subprocess.Popen[bytes], Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(directory), worker],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # the socket path, once bound
    assert line, f"publisher {worker} exited with {process.wait()}"
    return process, Path(line.decode().strip())


def _ids(events: list[KvEvent], worker: str) -> list[int]:
    return [e.event_id for e in events if e.worker_id == worker]


async def test_zmq_across_processes_and_killed_publisher(tmp_path: Path) -> None:
    directory = tmp_path / "ev"
    plane = ZmqEventPlane(directory, stale_sweep_s=0.5)
    await plane.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        events = Collector(plane, kv_events_topic("m"), KvEvent)
        first, first_sock = await asyncio.to_thread(_start_publisher, directory, "p1")
        processes.append(first)
        await events.wait_until(lambda items: len(_ids(items, "p1")) >= 10)
        second, _ = await asyncio.to_thread(_start_publisher, directory, "p2")
        processes.append(second)
        await events.wait_until(lambda items: len(_ids(items, "p2")) >= 10)

        first.send_signal(signal.SIGKILL)
        first.wait(WAIT_S)
        assert first_sock.exists()  # nobody removed it: the stale file a SIGKILL leaves
        seen = len(_ids(events.items, "p2"))
        await events.wait_until(lambda items: len(_ids(items, "p2")) >= seen + 50)
        # The subscriber removes the dead publisher's file (it is at least STALE_AGE_S old).
        await poll(lambda: not first_sock.exists())
        seen = len(_ids(events.items, "p2"))
        await events.wait_until(lambda items: len(_ids(items, "p2")) >= seen + 20)

        # Each publisher's events arrive in order, without gaps once flowing.
        for worker in ("p1", "p2"):
            ids = _ids(events.items, worker)
            assert ids == list(range(ids[0], ids[0] + len(ids))), worker
    finally:
        for process in processes:
            process.kill()
            process.wait()
            assert process.stdout is not None
            process.stdout.close()
        await plane.aclose()


async def test_zmq_aclose_removes_socket_and_publish_after_close_is_dropped(
    tmp_path: Path,
) -> None:
    plane = ZmqEventPlane(tmp_path / "ev")
    await plane.start()
    assert plane.socket_path.exists()
    await plane.aclose()
    assert not plane.socket_path.exists()
    plane.publish(load_topic("m"), load("w"))  # no error
    assert plane.dropped == 1


# -- nats: server restarts and outages ----------------------------------------------------------


async def test_nats_subscription_survives_server_restart(nats_server: NatsServer) -> None:
    pub = NatsEventPlane.from_url(nats_server.url)
    sub = NatsEventPlane.from_url(nats_server.url)
    await pub.start()
    await sub.start()
    try:
        events = Collector(sub, kv_events_topic(MODEL), KvEvent)
        next_id = 0

        def publish() -> None:
            nonlocal next_id
            pub.publish(kv_events_topic(MODEL), kv("w", next_id))
            next_id += 1

        await until_seen(publish, [events])
        await asyncio.to_thread(nats_server.restart)
        restarted_at = next_id
        deadline = time.monotonic() + 15
        while not events.items or events.items[-1].event_id < restarted_at:
            assert time.monotonic() < deadline, "no message after the restart"
            publish()
            await asyncio.sleep(0.05)
        assert pub.connected and sub.connected
        ids = [e.event_id for e in events.items]
        assert ids == sorted(ids)  # order holds; messages around the restart may be lost
    finally:
        await pub.aclose()
        await sub.aclose()


async def test_nats_publish_while_server_down_neither_raises_nor_blocks(
    nats_server: NatsServer,
) -> None:
    plane = NatsEventPlane.from_url(nats_server.url, max_outbox=10_000)
    await plane.start()
    try:
        await asyncio.to_thread(nats_server.stop)
        await poll(lambda: not plane.connected)
        started = time.monotonic()
        for i in range(50_000):
            plane.publish(kv_events_topic(MODEL), kv("w", i))
        assert time.monotonic() - started < 5.0
        await asyncio.sleep(0.2)  # the flusher hands what fits to nats-py, drops the rest
        assert plane.dropped > 0
        await asyncio.to_thread(nats_server.start)
        await poll(lambda: plane.connected)
    finally:
        await plane.aclose()


async def test_nats_unreachable_at_start_is_a_config_error() -> None:
    plane = NatsEventPlane([f"nats://127.0.0.1:{free_port()}"], connect_timeout_s=0.5)
    with pytest.raises(ConfigError, match="cannot reach NATS"):
        await plane.start()
    await plane.aclose()
