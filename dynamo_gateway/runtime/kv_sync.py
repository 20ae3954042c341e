"""Keeping a router's view of every worker's KV cache in step over a lossy event plane.

Each worker numbers its `KvEvent`s 1, 2, 3, ... (`KvEventPublisher`). The event
plane (NATS, ZMQ, a slow subscriber's bounded queue) may lose, repeat or hold
back events, and a router that starts late has missed everything before. One
`KvEventSync` per model on a frontend sits between the subscription and the
router; its owner wires up I/O, this class only decides (no I/O, no asyncio)::

    sync = KvEventSync(router.on_kv_event, request_dump)
    # request_dump(worker_id) starts fetching that worker's `KvSnapshot` in the
    # background and later calls sync.on_snapshot(snap) or sync.on_dump_failed(worker_id)
    async for event in events.subscribe(kv_events_topic(model), KvEvent):
        sync.on_event(event)
    # and from discovery: sync.worker_added(worker_id) / sync.worker_removed(worker_id)

Algorithm, per worker. ``last`` is the id of the last event whose effect the
router has (None: the worker's state is unknown); the router's view of the worker
is exactly the worker's cache after event ``last``.

* **In order** (``event_id == last + 1``): deliver it, ``last += 1``; if events
  were held back, deliver those that now follow on (see replay).
* **Duplicate** (``event_id <= last``): drop it (``duplicates_dropped``).
* **From the start** (unknown worker, ``event_id == 1``, unless ``from_start``
  is off): a worker's cache is empty before its first event, so this is its whole
  stream: deliver an `AllBlocksCleared` (id 0, in case the router holds a stale
  view), then the event; no dump needed. This spares a dump per worker when
  frontends and workers start together.
* **Gap** (``event_id > last + 1``, counted in ``gaps`` once per hole) or
  **unknown worker**: hold the event in the worker's buffer and ask for a dump
  (``request_dump``), unless one is pending already: at most one dump per worker
  is in flight. The buffer is bounded (``max_buffered``, default 10 000): on
  overflow the oldest held event is dropped (``buffer_overflows``); if the
  snapshot then does not reach the oldest kept event, the replay below finds the
  hole and asks for another dump.
* **Snapshot** (`on_snapshot`, accepted only while a dump of that worker is
  pending; a late or unasked one is ignored): if it is newer than ``last`` (or the
  worker is unknown) the router gets an `AllBlocksCleared` for the worker, then
  one `BlockStored` per snapshot entry, all numbered ``snapshot.event_id``, and
  ``last = snapshot.event_id``. A snapshot not newer than ``last`` is ignored
  (the lost events turned up after all, the view is already current). Then
  **replay**: the held events are sorted by id; those ``<= last`` are covered and
  dropped, the ones that follow on are delivered in order, and at the first hole
  the rest stays held and another dump is requested.
* **Dump failed** (`on_dump_failed`): nothing pending any more; the worker's next
  event (or `retry_dumps()`, for an owner that retries on a timer) asks again.
* **Heartbeat** (`on_heartbeat`, optional): a worker's own word of its last event
  id (e.g. in its load reports). A gap at the end of a burst shows no later
  event, so without heartbeats it is only found when the worker publishes again;
  a heartbeat ahead of ``last`` asks for a dump at once (and id 0 from an
  unknown worker makes it known and empty, as above).
* **Discovery**: `worker_added` asks for a dump of a worker whose state is
  unknown, so that a router that (re)started rebuilds its view of idle workers
  too (a repeated add of a known worker, e.g. a changed record, does nothing).
  `worker_removed` forgets the worker (its ``last``, buffer, pending dump) and
  ignores its stragglers (late events, a late snapshot) until it is added again;
  the router forgets it on its own (`Router.remove_worker`).
* **Router errors**: if ``deliver`` raises, the worker's state becomes unknown
  (its view may be half-updated); its next event asks for a dump.

Limits: a worker that restarts under the same id numbers its events from 1
again; those look like duplicates until discovery reports the restart
(`worker_removed` then `worker_added`), so worker ids should be unique per
worker process, or registrations short-lived. Not thread-safe: call every
method from one thread (the frontend's event loop); ``request_dump`` may call
`on_snapshot` synchronously (re-entrancy is handled), but ``deliver`` must not
call back into this object.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable

from dynamo_gateway.protocol.kv_events import AllBlocksCleared, KvEvent, KvSnapshot

__all__ = ["DEFAULT_MAX_BUFFERED", "KvEventSync", "engine_kv_snapshot"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFERED = 10_000
# Removed workers whose stragglers are ignored; the oldest are forgotten first.
_MAX_REMOVED = 4096


def _event_id(event: KvEvent) -> int:
    return event.event_id


class KvEventSync:
    """Per-worker ordering, gap detection and snapshot re-sync (see the module docstring)."""

    def __init__(
        self,
        deliver: Callable[[KvEvent], None],
        request_dump: Callable[[str], None],
        *,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        from_start: bool = True,
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be positive")
        self._deliver = deliver
        self._request_dump = request_dump
        self._max_buffered = max_buffered
        self._from_start = from_start
        self._last: dict[str, int] = {}  # workers whose view is current, up to this id
        self._buffers: dict[str, deque[KvEvent]] = {}  # held-back events, arrival order
        self._pending: set[str] = set()  # workers with a dump in flight
        self._added: set[str] = set()  # workers discovery told us about
        self._removed: OrderedDict[str, None] = OrderedDict()
        # Counters (monotonic, for stats and tests).
        self.events_delivered = 0  # events from the stream passed to `deliver`
        self.duplicates_dropped = 0
        self.gaps = 0  # holes seen in a known worker's event ids
        self.buffer_overflows = 0  # held events dropped because a buffer was full
        self.dumps_requested = 0
        self.dumps_failed = 0
        self.snapshots_applied = 0
        self.snapshots_ignored = 0  # unasked, late, or not newer than the view
        self.stragglers_ignored = 0  # events from removed workers
        self.deliver_errors = 0

    # -- introspection ------------------------------------------------------------------

    def last_event_id(self, worker_id: str) -> int | None:
        """The id up to which the router's view of the worker is current (None: unknown)."""
        return self._last.get(worker_id)

    def is_synced(self, worker_id: str) -> bool:
        """Whether the router's view of the worker is current and nothing is held back."""
        return worker_id in self._last and not self._buffers.get(worker_id)

    def dump_pending(self, worker_id: str) -> bool:
        return worker_id in self._pending

    def num_buffered(self, worker_id: str) -> int:
        buf = self._buffers.get(worker_id)
        return len(buf) if buf else 0

    def unsynced_workers(self) -> list[str]:
        """Workers that need a dump and have none in flight (what `retry_dumps` asks for)."""
        candidates = self._added | self._buffers.keys()
        return sorted(w for w in candidates if not self.is_synced(w) and w not in self._pending)

    # -- inputs -------------------------------------------------------------------------

    def on_event(self, event: KvEvent) -> None:
        """One event from the event plane, in any order, possibly repeated."""
        w = event.worker_id
        if w in self._removed:
            self.stragglers_ignored += 1
            return
        eid = event.event_id
        last = self._last.get(w)
        if last is not None:
            if eid <= last:
                self.duplicates_dropped += 1
                return
            if eid == last + 1:
                if self._deliver_one(event) and self._buffers.get(w):
                    self._replay(w)
                return
        elif eid == 1 and self._from_start:
            if self._start_empty(w) and self._deliver_one(event) and self._buffers.get(w):
                self._replay(w)
            return
        buf = self._buffers.get(w)
        if buf is None:
            buf = self._buffers[w] = deque()
        if last is not None:
            expected = buf[-1].event_id + 1 if buf else last + 1
            if eid > expected:
                self.gaps += 1
        if len(buf) >= self._max_buffered:
            buf.popleft()
            self.buffer_overflows += 1
        buf.append(event)
        self._request(w)

    def on_snapshot(self, snapshot: KvSnapshot) -> None:
        """The dump that `request_dump(snapshot.worker_id)` asked for."""
        w = snapshot.worker_id
        if w not in self._pending:
            self.snapshots_ignored += 1
            return
        self._pending.discard(w)
        sid = snapshot.event_id
        last = self._last.get(w)
        if last is not None and sid <= last:
            self.snapshots_ignored += 1
        else:
            self._last.pop(w, None)  # unknown until the whole snapshot is in
            try:
                self._deliver(KvEvent(worker_id=w, event_id=sid, data=AllBlocksCleared()))
                for block in snapshot.blocks:
                    self._deliver(KvEvent(worker_id=w, event_id=sid, data=block))
            except Exception:
                log.exception("KV sync: applying the snapshot of worker %s failed", w)
                self.deliver_errors += 1
                return
            self._last[w] = sid
            self.snapshots_applied += 1
        self._replay(w)

    def on_dump_failed(self, worker_id: str) -> None:
        """The dump could not be fetched; the worker's next event (or `retry_dumps`) asks again."""
        if worker_id in self._pending:
            self._pending.discard(worker_id)
            self.dumps_failed += 1

    def on_heartbeat(self, worker_id: str, last_event_id: int) -> None:
        """The worker says `last_event_id` is the last event it published."""
        w = worker_id
        if w in self._removed:
            return
        last = self._last.get(w)
        if last is not None and last_event_id <= last:
            return
        if last is None and last_event_id == 0 and self._from_start:
            self._start_empty(w)
            return
        if last is not None and not self._buffers.get(w):
            self.gaps += 1
        self._request(w)

    def retry_dumps(self) -> int:
        """Ask for a dump of every worker that needs one and has none in flight; how many."""
        workers = self.unsynced_workers()
        for w in workers:
            self._request(w)
        return len(workers)

    def worker_added(self, worker_id: str) -> None:
        """Discovery found the worker: fetch its state unless it is known already."""
        self._removed.pop(worker_id, None)
        self._added.add(worker_id)
        if worker_id not in self._last:
            self._request(worker_id)

    def worker_removed(self, worker_id: str) -> None:
        """The worker left: forget it, and ignore what still arrives from it."""
        self._last.pop(worker_id, None)
        self._buffers.pop(worker_id, None)
        self._pending.discard(worker_id)
        self._added.discard(worker_id)
        removed = self._removed
        removed[worker_id] = None
        removed.move_to_end(worker_id)
        while len(removed) > _MAX_REMOVED:
            removed.popitem(last=False)

    # -- internals ----------------------------------------------------------------------

    def _start_empty(self, w: str) -> bool:
        """Make an unknown worker known with an empty cache, as before its first event."""
        try:
            self._deliver(KvEvent(worker_id=w, event_id=0, data=AllBlocksCleared()))
        except Exception:
            log.exception("KV sync: clearing the view of worker %s failed", w)
            self.deliver_errors += 1
            return False
        self._last[w] = 0
        return True

    def _deliver_one(self, event: KvEvent) -> bool:
        """Deliver a next-in-order event; on a router error the worker becomes unknown."""
        try:
            self._deliver(event)
        except Exception:
            log.exception(
                "KV sync: delivering event %d of worker %s failed", event.event_id, event.worker_id
            )
            self.deliver_errors += 1
            self._last.pop(event.worker_id, None)
            return False
        self._last[event.worker_id] = event.event_id
        self.events_delivered += 1
        return True

    def _replay(self, w: str) -> None:
        """Deliver the held events that follow on from `last`; at a hole, ask for a dump."""
        buf = self._buffers.get(w)
        last = self._last.get(w)
        if not buf or last is None:
            return
        events = sorted(buf, key=_event_id)
        buf.clear()
        for i, event in enumerate(events):
            eid = event.event_id
            if eid <= last:
                continue  # covered by the snapshot, or repeated
            if eid != last + 1:
                buf.extend(events[i:])
                self._request(w)
                return
            if not self._deliver_one(event):
                buf.extend(events[i + 1 :])
                return
            last = eid
        del self._buffers[w]

    def _request(self, w: str) -> None:
        if w in self._pending:
            return
        self._pending.add(w)
        self.dumps_requested += 1
        try:
            self._request_dump(w)
        except Exception:
            log.exception("KV sync: requesting a dump of worker %s failed", w)
            self.on_dump_failed(w)


def engine_kv_snapshot(engine: object) -> KvSnapshot | None:
    """An in-process engine's `kv_snapshot()`, or None if it has none (it is optional).

    Errors of the engine (`EngineError`: not started, no KV events) propagate.
    """
    method = getattr(engine, "kv_snapshot", None)
    if method is None:
        return None
    snapshot = method()
    if not isinstance(snapshot, KvSnapshot):
        raise TypeError(f"{type(engine).__name__}.kv_snapshot() returned {type(snapshot)!r}")
    return snapshot
