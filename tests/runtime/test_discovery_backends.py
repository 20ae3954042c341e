"""Discovery backends against one contract (memory, file, etcd), plus leases and
etcd restarts with a real etcd process (the ``etcd_server`` fixture)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.plugins import load_plugins
from dynamo_gateway.runtime.connect import connect_discovery
from dynamo_gateway.runtime.discovery import (
    ChangeKind,
    Discovery,
    DiscoveryEvent,
    MemoryDiscovery,
    WorkerRecord,
)
from dynamo_gateway.runtime.etcd_discovery import EtcdDiscovery, parse_etcd_url
from dynamo_gateway.runtime.file_discovery import FileDiscovery, parse_file_url, record_filename
from dynamo_gateway.servers.etcd import EtcdServer
from dynamo_gateway.settings import load_settings

TTL = 2.0
WAIT = 5.0  # any single event
EXPIRY_WAIT = TTL + 4.0  # a lease running out (etcd checks expiry every 0.5 s)

Make = Callable[[], Awaitable[Discovery]]


def record(worker_id: str, **changes: Any) -> WorkerRecord:
    base = WorkerRecord(
        worker_id=worker_id,
        model="demo",
        model_path="/models/demo",
        address=f"tcp://127.0.0.1:{9000 + len(worker_id)}",
    )
    return msgspec.structs.replace(base, **changes)


class Watching:
    """A task that drains `discovery.watch()` into a queue, as a frontend would, so
    the watch stays live (its etcd stream open) while the test does other things."""

    def __init__(self, discovery: Discovery) -> None:
        self.queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue()
        self._events = discovery.watch()
        self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        async for event in self._events:
            self.queue.put_nowait(event)
        self.queue.put_nowait(None)  # the watch ended

    async def next(self, timeout: float = WAIT) -> DiscoveryEvent:
        event = await asyncio.wait_for(self.queue.get(), timeout)
        assert event is not None, "the watch ended"
        return event

    async def wait(
        self, kind: ChangeKind, worker_id: str, timeout: float = WAIT, *, address: str = ""
    ) -> DiscoveryEvent:
        """Skip events until `kind` for `worker_id` (and `address`, if given) arrives."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.next(timeout)
                if (event.kind, event.record.worker_id) == (kind, worker_id) and (
                    not address or event.record.address == address
                ):
                    return event

    async def rest(self, timeout: float = WAIT) -> list[DiscoveryEvent]:
        """Every event until the watch ends (which it must, within `timeout`)."""
        events: list[DiscoveryEvent] = []
        async with asyncio.timeout(timeout):
            while (event := await self.queue.get()) is not None:
                events.append(event)
        return events

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._events.aclose()


@contextlib.asynccontextmanager
async def watching(discovery: Discovery) -> AsyncIterator[Watching]:
    watch = Watching(discovery)
    try:
        yield watch
    finally:
        await watch.close()


async def wait_listed(discovery: Discovery, worker_id: str, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(ConnectionError):
                if worker_id in {r.worker_id for r in await discovery.list()}:
                    return
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def instances(make: Make) -> AsyncIterator[Make]:
    """`make()` starts another instance (another "process"); all closed at the end."""
    started: list[Discovery] = []

    async def start() -> Discovery:
        discovery = await make()
        await discovery.start()
        started.append(discovery)
        return discovery

    try:
        yield start
    finally:
        for discovery in started:
            await discovery.aclose()


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """`make()` for one backend; every call is another client ("process") of one store."""
    if kind == "memory":
        shared = MemoryDiscovery()  # one process: every "instance" is the same object

        async def memory() -> Discovery:
            return shared

        return memory
    if kind == "file":

        async def file() -> Discovery:
            return FileDiscovery(tmp_path / "discovery", TTL)

        return file
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return lambda: _etcd(server.url + "/test")


async def _etcd(url: str) -> Discovery:
    return EtcdDiscovery.from_url(url, TTL)


@pytest.fixture(params=["memory", "file", "etcd"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    return make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["file", "etcd"])
def shared_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    """Backends whose instances are separate clients of one store."""
    return make_backend(request.param, request, tmp_path)


# -- the contract ---------------------------------------------------------------------


async def test_register_update_deregister(backend: Make) -> None:
    async with instances(backend) as start:
        discovery = await start()
        await discovery.register(record("w1"))
        async with watching(discovery) as events:
            assert await events.next() == DiscoveryEvent(ChangeKind.PUT, record("w1"))
            await discovery.register(record("w/2 odd:id"))
            assert (await events.next()).record == record("w/2 odd:id")

            changed = record("w1", draining=True)
            await discovery.register(changed)
            assert await events.next() == DiscoveryEvent(ChangeKind.PUT, changed)
            listed = sorted(await discovery.list(), key=lambda r: r.worker_id)
            assert listed == [record("w/2 odd:id"), changed]

            await discovery.deregister("w1")
            event = await events.next()
            assert (event.kind, event.record.worker_id) == (ChangeKind.DELETE, "w1")
            assert [r.worker_id for r in await discovery.list()] == ["w/2 odd:id"]
            await discovery.deregister("never-registered")

            await discovery.aclose()
            # After aclose() the watch ends (perhaps after the DELETE of w/2).
            rest = await events.rest()
            assert all(e.kind is ChangeKind.DELETE for e in rest)


async def test_instances_see_each_other(shared_backend: Make) -> None:
    async with instances(shared_backend) as start:
        worker, frontend = await start(), await start()
        async with watching(frontend) as events:
            await worker.register(record("a"))
            assert await events.next() == DiscoveryEvent(ChangeKind.PUT, record("a"))
            await worker.register(record("b"))
            assert await events.next() == DiscoveryEvent(ChangeKind.PUT, record("b"))
            assert {r.worker_id for r in await frontend.list()} == {"a", "b"}

            # A late watcher starts with the current records.
            async with watching(frontend) as late:
                got = {(await late.next()).record.worker_id for _ in range(2)}
                assert got == {"a", "b"}

            await worker.aclose()  # its records leave with it, at once
            gone = {(await events.next(2.0)).record.worker_id for _ in range(2)}
            assert gone == {"a", "b"}
            assert await frontend.list() == []


# -- leases ---------------------------------------------------------------------------

_REGISTER_AND_SLEEP = """
import asyncio, sys
from dynamo_gateway.runtime.discovery import WorkerRecord
from dynamo_gateway.runtime.etcd_discovery import EtcdDiscovery
from dynamo_gateway.runtime.file_discovery import FileDiscovery

async def main(url: str, worker_id: str) -> None:
    cls = FileDiscovery if url.startswith("file:") else EtcdDiscovery
    discovery = cls.from_url(url, float(sys.argv[3]))
    await discovery.start()
    await discovery.register(
        WorkerRecord(worker_id=worker_id, model="demo", model_path="/m", address="tcp://x:1")
    )
    print("registered", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@contextlib.asynccontextmanager
async def registering_process(url: str, worker_id: str) -> AsyncIterator[subprocess.Popen[str]]:
    """A separate process that registers `worker_id` and then just lives."""
    process = subprocess.Popen(
        [sys.executable, "-c", _REGISTER_AND_SLEEP, url, worker_id, str(TTL)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20.0)
        assert line.strip() == "registered", f"worker process said {line!r}"
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def discovery_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "file":
        return f"file://{tmp_path / 'discovery'}"
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return server.url + "/test"


@pytest.mark.parametrize("kind", ["file", "etcd"])
async def test_killed_worker_expires(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = discovery_url(kind, tmp_path, request)
    watcher: Discovery
    if kind == "file":
        watcher = FileDiscovery.from_url(url, TTL)
    else:
        watcher = EtcdDiscovery.from_url(url, TTL)
    await watcher.start()
    try:
        async with (
            registering_process(url, "doomed") as process,
            watching(watcher) as events,
        ):
            await events.wait(ChangeKind.PUT, "doomed")
            await asyncio.sleep(TTL)  # heartbeats keep it alive past one TTL
            assert [r.worker_id for r in await watcher.list()] == ["doomed"]
            process.kill()
            await events.wait(ChangeKind.DELETE, "doomed", EXPIRY_WAIT)
            assert await watcher.list() == []
    finally:
        await watcher.aclose()


async def test_file_frozen_worker_expires_and_returns(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'discovery'}"
    watcher = FileDiscovery.from_url(url, TTL)
    await watcher.start()
    try:
        async with (
            registering_process(url, "frozen") as process,
            watching(watcher) as events,
        ):
            await events.wait(ChangeKind.PUT, "frozen")
            process.send_signal(signal.SIGSTOP)
            await events.wait(ChangeKind.DELETE, "frozen", EXPIRY_WAIT)
            process.send_signal(signal.SIGCONT)  # its next heartbeat brings it back
            await events.wait(ChangeKind.PUT, "frozen", WAIT)
    finally:
        await watcher.aclose()


async def test_etcd_stopped_keep_alive_expires(etcd_server: EtcdServer) -> None:
    url = etcd_server.url + "/test"
    async with instances(lambda: _etcd(url)) as start:
        worker, frontend = await start(), await start()
        async with watching(frontend) as events:
            await worker.register(record("w"))
            await events.wait(ChangeKind.PUT, "w")
            assert isinstance(worker, EtcdDiscovery)
            assert worker._keep_alive is not None
            worker._keep_alive.cancel()  # as if the process froze
            await events.wait(ChangeKind.DELETE, "w", EXPIRY_WAIT)


async def test_file_stale_and_bad_files_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "discovery"
    discovery = FileDiscovery(directory, TTL)
    await discovery.start()
    try:
        (directory / "garbage.json").write_text("{not json")
        (directory / "old.json").write_bytes(b"{}")
        os.utime(directory / "old.json", (0, 0))  # long dead: the watcher removes it
        await discovery.register(record("ok"))
        assert [r.worker_id for r in await discovery.list()] == ["ok"]
        assert [r.worker_id for r in await discovery.list()] == ["ok"]
        assert sum("garbage.json" in r.getMessage() for r in caplog.records) == 1
        assert not (directory / "old.json").exists()
        assert (directory / "garbage.json").exists()
    finally:
        await discovery.aclose()
    assert list(directory.iterdir()) == [directory / "garbage.json"]


def test_record_filenames_are_safe() -> None:
    for worker_id in ["a/b", "..", ".hidden", "x" * 500, "ünï cödé", ""]:
        name = record_filename(worker_id)
        assert "/" not in name and not name.startswith(".") and len(name) < 255
        assert name.endswith(".json")
    assert record_filename("a/b") != record_filename("a%2Fb")


# -- etcd restarts --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["restart", "kill", "wipe"])
async def test_etcd_restart(how: str, etcd_server: EtcdServer) -> None:
    url = etcd_server.url + "/test"
    async with instances(lambda: _etcd(url)) as start:
        worker, frontend = await start(), await start()
        async with watching(frontend) as events:
            await worker.register(record("before"))
            await events.wait(ChangeKind.PUT, "before")
            await worker.register(record("probe"))  # arrives through the open watch stream
            await events.wait(ChangeKind.PUT, "probe")

            await asyncio.to_thread(etcd_server.restart, how == "wipe", kill=how == "kill")

            # The record is there (again) for a newcomer, listing and watching.
            newcomer = await start()
            await wait_listed(newcomer, "before", EXPIRY_WAIT)
            async with watching(newcomer) as fresh:
                await fresh.wait(ChangeKind.PUT, "before")

            # The old watch carries on: it sees changes made after the restart.
            await worker.register(record("after"))
            await events.wait(ChangeKind.PUT, "after", EXPIRY_WAIT)
            await worker.register(record("before", address="tcp://moved:1"))
            await events.wait(ChangeKind.PUT, "before", WAIT, address="tcp://moved:1")


async def test_etcd_watch_survives_downtime(etcd_server: EtcdServer) -> None:
    """etcd down for longer than a lease: records come back, the watch reconciles."""
    url = etcd_server.url + "/test"
    async with instances(lambda: _etcd(url)) as start:
        worker, frontend = await start(), await start()
        async with watching(frontend) as events:
            await worker.register(record("w"))
            await events.wait(ChangeKind.PUT, "w")
            await asyncio.to_thread(etcd_server.stop)
            await worker.register(record("queued"))  # logged, retried by the keep-alive
            await asyncio.sleep(TTL + 0.5)
            await asyncio.to_thread(etcd_server.start)
            await events.wait(ChangeKind.PUT, "queued", EXPIRY_WAIT)
            await wait_listed(frontend, "w")


# -- URLs and registration ------------------------------------------------------------


def test_urls() -> None:
    assert parse_file_url("file:///var/run/dg") == Path("/var/run/dg")
    assert parse_file_url("file://localhost/a%20b") == Path("/a b")
    for bad in ["file://relative", "file://relative/dir", "file:", "file:///x?y=1"]:
        with pytest.raises(ConfigError, match="file"):
            parse_file_url(bad)

    assert parse_etcd_url("etcd://h:1234/ns") == ("h", 1234, "ns")
    assert parse_etcd_url("etcd://h") == ("h", 2379, "dynamo-gateway")
    assert parse_etcd_url("etcd://[::1]:5/") == ("[::1]", 5, "dynamo-gateway")
    for bad in ["etcd://", "etcd://:2379", "etcd://h:port", "etcd://h:99999", "etcd://u:p@h"]:
        with pytest.raises(ConfigError, match="etcd"):
            parse_etcd_url(bad)


async def test_backends_are_registered(tmp_path: Path) -> None:
    registry = load_plugins(entry_points=False).registry
    settings = load_settings()
    assert {"memory", "file", "etcd"} <= set(registry.discovery.names())

    discovery = await connect_discovery(registry, f"file://{tmp_path}/d", settings)
    assert isinstance(discovery, FileDiscovery)
    assert discovery.lease_ttl_s == settings.runtime.lease_ttl_s
    await discovery.aclose()

    etcd = registry.discovery.get("etcd")("etcd://127.0.0.1:1/x", settings)
    assert isinstance(etcd, EtcdDiscovery)
    assert (etcd.port, etcd.namespace, etcd.ttl) == (1, "x", 3)
    with pytest.raises(ConfigError):
        registry.discovery.get("file")("file://relative", settings)
