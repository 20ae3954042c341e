"""Discovery through a shared directory: ``file:///abs/dir``, one host, no server.

Each worker is one JSON file, ``<encoded worker id>.json``, written atomically
(temporary file + ``os.replace``). The file's mtime is the lease: the process
that registered it touches it every ``lease_ttl_s / 3``, and a file whose mtime
is older than ``lease_ttl_s`` counts as gone, so a worker that was killed or
stopped drops out within about one TTL. A resumed worker's heartbeat brings
its record back (rewriting the file if a watcher had removed it meanwhile).

Watchers poll: one ``scandir`` + ``stat`` per file every `POLL_INTERVAL_S`, and
a file is re-read only when its stat changed. Everything is local-disk I/O on
small files, so it runs on the event loop without a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import msgspec

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.runtime.discovery import (
    ChangeKind,
    DiscoveryEvent,
    WorkerRecord,
    decode_record,
    encode_record,
)

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.15
SUFFIX = ".json"
# Files older than this many TTLs are removed by watchers: their owner is gone
# (a live owner, even one just resumed from SIGSTOP, rewrites its file).
STALE_REMOVE_TTLS = 2.0
_MAX_NAME = 200  # bytes; file systems allow 255


def record_filename(worker_id: str) -> str:
    """The file name for a worker id: percent-encoded, hashed when too long.

    Names never start with a dot (temporary files do) and never contain ``/``.
    """
    name = quote(worker_id, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if not name or len(name) > _MAX_NAME:
        name = "sha256-" + hashlib.sha256(worker_id.encode()).hexdigest()
    return name + SUFFIX


def parse_file_url(url: str) -> Path:
    """The directory of a ``file:///abs/dir`` URL (``file://localhost/abs/dir`` too)."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise ConfigError(f"not a file:// URL: {url!r}")
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ConfigError(
            f"file discovery needs an absolute directory, like file:///var/run/dynamo "
            f"(three slashes), not {url!r}"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"file discovery URL takes no query or fragment: {url!r}")
    return Path(unquote(parts.path))


@dataclass
class _Entry:
    """What a scan knows about one file."""

    stat_key: tuple[int, int, int]  # (inode, size, mtime_ns): re-read when it changes
    data: bytes
    record: WorkerRecord | None  # None: the file does not decode


class FileDiscovery:
    """`Discovery` over a directory shared by the processes of one host."""

    @classmethod
    def from_url(cls, url: str, lease_ttl_s: float) -> FileDiscovery:
        return cls(parse_file_url(url), lease_ttl_s)

    def __init__(self, directory: Path, lease_ttl_s: float) -> None:
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be positive, not {lease_ttl_s}")
        self.directory = Path(directory)
        self.lease_ttl_s = lease_ttl_s
        self._records: dict[str, WorkerRecord] = {}  # registered by this instance
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._bad_files: set[str] = set()  # logged once each

    # -- Discovery ---------------------------------------------------------------------

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    async def register(self, record: WorkerRecord) -> None:
        if self._closed.is_set():
            raise RuntimeError("FileDiscovery is closed")
        self._records[record.worker_id] = record
        self._write(record)
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(
                self._heartbeat_loop(), name=f"file-discovery-heartbeat:{self.directory}"
            )

    async def deregister(self, worker_id: str) -> None:
        if self._records.pop(worker_id, None) is not None:
            self._remove(worker_id)

    async def list(self) -> list[WorkerRecord]:
        live, _ = self._scan({})
        return [entry.record for entry in live.values() if entry.record is not None]

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        entries: dict[str, _Entry] = {}  # this watcher's stat cache
        yielded: dict[str, WorkerRecord] = {}  # file name -> record last announced
        while True:
            live, entries = self._scan(entries)
            for name in [n for n in yielded if n not in live or live[n].record is None]:
                yield DiscoveryEvent(ChangeKind.DELETE, yielded.pop(name))
            for name, entry in live.items():
                if entry.record is not None and yielded.get(name) != entry.record:
                    yielded[name] = entry.record
                    yield DiscoveryEvent(ChangeKind.PUT, entry.record)
            if self._closed.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._closed.wait()
            if self._closed.is_set():
                return

    async def aclose(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        for worker_id in list(self._records):
            self._remove(worker_id)
        self._records.clear()

    # -- files -------------------------------------------------------------------------

    def _path(self, worker_id: str) -> Path:
        return self.directory / record_filename(worker_id)

    def _write(self, record: WorkerRecord) -> None:
        path = self._path(record.worker_id)
        tmp = self.directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(encode_record(record))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _remove(self, worker_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(worker_id).unlink()

    async def _heartbeat_loop(self) -> None:
        interval = self.lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            for record in list(self._records.values()):
                try:
                    os.utime(self._path(record.worker_id))
                except FileNotFoundError:
                    # A watcher took us for dead (we were stopped or starved): come back.
                    log.info("re-announcing worker %s in %s", record.worker_id, self.directory)
                    self._write(record)
                except OSError as exc:
                    log.warning("heartbeat for worker %s failed: %s", record.worker_id, exc)

    def _scan(self, cache: dict[str, _Entry]) -> tuple[dict[str, _Entry], dict[str, _Entry]]:
        """(live entries, new stat cache) by file name; reads only files whose stat changed."""
        now_ns = time.time_ns()
        ttl_ns = int(self.lease_ttl_s * 1e9)
        live: dict[str, _Entry] = {}
        seen: dict[str, _Entry] = {}
        try:
            dir_entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return live, seen
        for dir_entry in dir_entries:
            name = dir_entry.name
            if name.startswith(".") or not name.endswith(SUFFIX):
                continue
            try:
                st = dir_entry.stat()
            except FileNotFoundError:
                continue
            age_ns = now_ns - st.st_mtime_ns
            if age_ns > ttl_ns:
                if age_ns > STALE_REMOVE_TTLS * ttl_ns:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dir_entry.path)
                continue
            stat_key = (st.st_ino, st.st_size, st.st_mtime_ns)
            entry = cache.get(name)
            if entry is None or entry.stat_key != stat_key:
                entry = self._read(dir_entry.path, name, stat_key, entry)
                if entry is None:
                    continue
            seen[name] = live[name] = entry
        self._bad_files &= seen.keys()
        return live, seen

    def _read(
        self, path: str, name: str, stat_key: tuple[int, int, int], old: _Entry | None
    ) -> _Entry | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if old is not None and old.data == data:  # only touched by a heartbeat
            return _Entry(stat_key, data, old.record)
        try:
            record: WorkerRecord | None = decode_record(data)
        except msgspec.DecodeError as exc:
            record = None
            if name not in self._bad_files:
                self._bad_files.add(name)
                log.warning("ignoring %s: not a worker record (%s)", path, exc)
        else:
            self._bad_files.discard(name)
        return _Entry(stat_key, data, record)
