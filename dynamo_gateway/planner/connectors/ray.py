"""The `ray` connector: each worker is a Ray actor that runs `dynamo-gateway worker`.

Settings come from ``[plugin_config.ray]`` (`RaySettings`)::

    connector = "ray"

    [plugin_config.ray]
    address = "10.0.0.1:6379"        # the cluster's GCS; "auto": the local one
    namespace = "dynamo-gateway"     # one planner per namespace and model set
    num_cpus = 0.25                  # what Ray reserves per worker (accounting, no limit)
    num_gpus = 1
    scheduling = "SPREAD"            # or "DEFAULT" (Ray packs by its own rules)
    runtime_env = { env_vars = { HF_HOME = "/models" } }

The actor (`WorkerHost`) starts the worker with its node's interpreter and logs
it to ``<log_dir>/<worker id>.log`` on that node (``log_dir`` from the planner's
config, else a temporary directory there). Removal sends SIGTERM through the
actor (the worker drains, see `dynamo_gateway.runtime.worker`); the actor kills
it if it still runs ``kill_after_s`` later. The planner keeps no connection open
per worker: a task per actor polls its status and caches it, so `managed()`
never waits on Ray. A worker whose process exits by itself, or whose actor dies
with its node, leaves `managed()` and the planner refills its pool.

The actors are *detached* and named ``dgw-worker-<worker id>`` in the namespace:
a planner restart must not take the fleet down with it (a non-detached actor
dies with its driver, and Ray kills its worker without a drain). With
``--keep-workers`` the planner exits and leaves them serving; the next planner
on the same namespace adopts the workers of the pools it plans (`start`), so
only a clean stop drains them. The price: a planner that dies hard (SIGKILL)
leaves its workers running until a planner starts again on that namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import PlannerConfig
from dynamo_gateway.planner.connector import ManagedWorker, WorkerSpec, WorkerState, new_worker_id
from dynamo_gateway.planner.observe import PoolKey
from dynamo_gateway.protocol.engine import WorkerRole

__all__ = [
    "HostStatus",
    "RayConnector",
    "RaySettings",
    "WorkerHost",
    "make_ray_connector",
    "pool_of",
]

log = logging.getLogger(__name__)

ACTOR_PREFIX = "dgw-worker-"
POLL_S = 0.5  # how often each actor is asked for its worker's status
CALL_TIMEOUT_S = 30.0  # a status or drain call slower than this is retried next time


class RaySettings(BaseModel):
    """``[plugin_config.ray]``: where the workers run and what each one reserves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field("auto", description="Ray cluster address (GCS host:port) or 'auto'")
    namespace: str = Field("dynamo-gateway", min_length=1, description="Ray namespace")
    # A worker process is mostly asleep between batches; a quarter CPU lets a
    # 2-CPU node hold eight of them. GPU engines should ask for num_gpus instead.
    num_cpus: float = Field(0.25, ge=0, description="CPUs Ray reserves per worker actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker (sets CUDA_VISIBLE_DEVICES)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per worker"
    )
    scheduling: Literal["SPREAD", "DEFAULT"] = "SPREAD"
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env of each worker actor"
    )
    connect_timeout_s: float = Field(
        60.0, gt=0, description="give up starting when the cluster does not answer"
    )
    kill_after_s: float = Field(120.0, gt=0, description="kill a draining worker after this")
    placement_timeout_s: float = Field(
        600.0, gt=0, description="give up on a worker no node has started within this"
    )

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, value: dict[str, float]) -> dict[str, float]:
        reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(value)
        if reserved:
            raise ValueError(f"use num_cpus / num_gpus, not resources {sorted(reserved)}")
        negative = [k for k, v in value.items() if v < 0]
        if negative:
            raise ValueError(f"negative resources {sorted(negative)}")
        return value


def ray_settings(config: PlannerConfig) -> RaySettings:
    try:
        return RaySettings(**config.plugin_config.get("ray", {}))
    except ValidationError as exc:
        raise ConfigError(f"invalid [plugin_config.ray]: {exc}") from exc


@dataclass(frozen=True)
class HostStatus:
    """What a `WorkerHost` reports about its worker process."""

    worker_id: str
    pid: int
    node_id: str
    node_ip: str
    log_path: str
    started: float  # wall clock (time.time()) on the node
    draining: bool
    exit_code: int | None  # None while it runs
    killed: bool  # killed after kill_after_s of draining


class WorkerHost:
    """The Ray actor around one worker process; it lives on the worker's node."""

    def __init__(self, worker_id: str, args: list[str], log_dir: str | None) -> None:
        import ray

        directory = Path(log_dir or Path(tempfile.gettempdir()) / "dynamo-gateway-workers")
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{worker_id}.log"
        self.worker_id = worker_id
        with self.log_path.open("ab") as out:
            # posix_spawn (close_fds=False), not fork: this process runs Ray's
            # gRPC threads (see the local connector). The environment is the
            # actor's, where Ray set CUDA_VISIBLE_DEVICES from num_gpus.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dynamo_gateway.cli", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=False,
            )  # fmt: skip
        self.started = time.time()
        self.node_id = str(ray.get_runtime_context().get_node_id())
        self.node_ip = str(ray.util.get_node_ip_address())
        self.draining = False
        self.killed = False

    def status(self) -> HostStatus:
        return HostStatus(
            self.worker_id, self.process.pid, self.node_id, self.node_ip, str(self.log_path),
            self.started, self.draining, self.process.poll(), self.killed,
        )  # fmt: skip

    def drain(self, kill_after_s: float) -> None:
        """SIGTERM the worker (it drains) and kill it `kill_after_s` later if it runs."""
        if self.draining:
            return
        self.draining = True
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        # The timer lives here, not in the planner, so it holds across a planner restart.
        timer = threading.Timer(kill_after_s, self._kill)
        timer.daemon = True
        timer.start()

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


@dataclass
class _Actor:
    worker_id: str
    pool: PoolKey
    handle: Any  # ray.actor.ActorHandle
    started_at: float  # this connector's monotonic clock
    state: WorkerState = WorkerState.STARTING
    placed: bool = False  # a node runs the actor and it has started the worker
    adopted: bool = False  # started by an earlier planner
    follower: asyncio.Task[None] | None = None


class RayConnector:
    def __init__(self, config: PlannerConfig, settings: RaySettings) -> None:
        self.settings = settings
        self._log_dir = str(config.log_dir) if config.log_dir is not None else None
        self._pools = {key for m in config.models for key in m.pool_keys()}
        self._actors: dict[str, _Actor] = {}
        self._used_s = 0.0  # worker-seconds of exited workers
        self._remote: Any = None  # ray.remote(WorkerHost)
        self.exits: list[tuple[str, int | None]] = []  # (worker id, exit code; None: lost)

    async def start(self) -> None:
        # The planner stops on SIGTERM by draining (its own asyncio handler): Ray's
        # C++ failure handler would print a stack trace for it (read when ray is
        # first imported), and ray.init on the main thread would replace the
        # handler with sys.exit. So init runs in a thread, which Ray warns about
        # on every start; that warning is dropped.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray

        s = self.settings
        logging.getLogger("ray._private.worker").addFilter(_drop_thread_warning)
        # log_to_driver=False keeps the actors' output off the planner's stdout,
        # where its ready line goes.
        init = functools.partial(
            ray.init, address=s.address, namespace=s.namespace, log_to_driver=False,
            logging_level=logging.WARNING,
        )  # fmt: skip
        try:
            await _in_daemon_thread(init, s.connect_timeout_s)
        except TimeoutError:
            raise ConfigError(
                f"no Ray cluster answered at {s.address} within {s.connect_timeout_s:g} s"
            ) from None
        except ConnectionError as exc:
            raise ConfigError(f"cannot connect to Ray at {s.address}: {exc}") from exc
        self._remote = ray.remote(WorkerHost)
        nodes = await asyncio.to_thread(ray.nodes)
        log.info("ray connector: cluster %s, namespace %s, %d nodes alive", s.address,
                 s.namespace, sum(1 for n in nodes if n.get("Alive")))  # fmt: skip
        await self._adopt()

    async def _adopt(self) -> None:
        """Take over the workers a previous planner left in this namespace: those of
        the pools planned here, placed or still pending (their names say the pool)."""
        import ray

        names = await asyncio.to_thread(ray.util.list_named_actors)
        for name in sorted(n for n in names if n.startswith(ACTOR_PREFIX)):
            worker_id = name.removeprefix(ACTOR_PREFIX)
            pool = pool_of(worker_id)
            if pool not in self._pools:
                log.info("ray connector: %s is not of a pool planned here: left alone", name)
                continue
            try:
                handle = await asyncio.to_thread(ray.get_actor, name)
            except ValueError:  # gone meanwhile
                continue
            # Its poller says "adopted" once the actor answers, and sets its start time.
            self._follow(_Actor(worker_id, pool, handle, time.monotonic(), adopted=True))

    def managed(self) -> list[ManagedWorker]:
        return [
            ManagedWorker(a.worker_id, a.pool, a.state, a.started_at) for a in self._actors.values()
        ]

    async def add(self, spec: WorkerSpec, count: int) -> list[str]:
        assert self._remote is not None, "start() first"
        s = self.settings
        ids: list[str] = []
        for _ in range(count):
            worker_id = new_worker_id(spec.pool, uuid.uuid4().hex[:8])
            options: dict[str, Any] = {
                "name": ACTOR_PREFIX + worker_id,
                "namespace": s.namespace,
                "lifetime": "detached",  # see the module docstring
                "max_restarts": 0,  # a lost worker is the planner's to replace
                "num_cpus": s.num_cpus,
                "num_gpus": s.num_gpus,
                "resources": dict(s.resources),
                "scheduling_strategy": s.scheduling,
            }
            if s.runtime_env:
                options["runtime_env"] = dict(s.runtime_env)
            args = (worker_id, spec.worker_args(worker_id), self._log_dir)
            # Creating a named actor is a blocking round trip to the GCS.
            handle = await asyncio.to_thread(self._create, options, args)
            actor = _Actor(worker_id, spec.pool, handle, time.monotonic())
            self._follow(actor)
            ids.append(worker_id)
            log.info("asked Ray for worker %s", worker_id)
        return ids

    def _create(self, options: dict[str, Any], args: tuple[Any, ...]) -> Any:
        return self._remote.options(**options).remote(*args)

    def _follow(self, actor: _Actor) -> None:
        self._actors[actor.worker_id] = actor
        actor.follower = asyncio.get_running_loop().create_task(self._poll(actor))

    def _update(self, actor: _Actor, status: HostStatus) -> None:
        if not actor.placed:
            actor.placed = True
            where = f"pid {status.pid} on node {status.node_id}, {status.node_ip}"
            if actor.adopted:
                actor.started_at = time.monotonic() - max(0.0, time.time() - status.started)
                log.info("adopted worker %s (%s)%s", actor.worker_id, where,
                         " draining" if status.draining else "")  # fmt: skip
            else:
                log.info("started worker %s (%s)", actor.worker_id, where)
        if status.draining:
            actor.state = WorkerState.DRAINING
        elif actor.state is WorkerState.STARTING:
            actor.state = WorkerState.RUNNING

    async def _poll(self, actor: _Actor) -> None:
        from ray.exceptions import ActorUnavailableError, RayActorError, RayError

        deadline = actor.started_at + self.settings.placement_timeout_s
        code: int | None = None
        why = ""
        while True:
            placing = not actor.placed  # drained or not: a pending actor may never start
            if placing and time.monotonic() >= deadline:
                why = f"no Ray node started it within {self.settings.placement_timeout_s:g} s"
                break
            # While Ray places the actor the call waits for it; later it answers at once.
            timeout = deadline - time.monotonic() if placing else CALL_TIMEOUT_S
            try:
                status: HostStatus = await asyncio.wait_for(
                    actor.handle.status.remote(), max(0.1, timeout)
                )
            except TimeoutError:
                continue  # a busy node answers late; ask again
            except ActorUnavailableError:
                await asyncio.sleep(POLL_S)  # its node is reconnecting
                continue
            except RayActorError as exc:
                why = f"its Ray actor died: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                break
            except RayError as exc:  # e.g. the GCS restarting: ask again
                log.warning("worker %s: status call failed: %s", actor.worker_id, exc)
                await asyncio.sleep(POLL_S)
                continue
            self._update(actor, status)
            if status.exit_code is not None:
                code = status.exit_code
                if status.killed:
                    why = f"killed {self.settings.kill_after_s:g} s after SIGTERM"
                break
            await asyncio.sleep(POLL_S)
        self._actors.pop(actor.worker_id, None)
        self._used_s += time.monotonic() - actor.started_at
        self.exits.append((actor.worker_id, code))
        if not actor.placed:
            how = "was never started"
        elif actor.state is WorkerState.DRAINING:
            how = "drained and exited"
        else:
            how = "exited by itself"
        log.log(
            logging.INFO if code == 0 and not why else logging.WARNING,
            "worker %s %s (code %s)%s", actor.worker_id, how, code, f": {why}" if why else "",
        )  # fmt: skip
        await self._release(actor)

    async def _release(self, actor: _Actor) -> None:
        import ray

        # Detached actors outlive everything but ray.kill; its process has exited.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(ray.kill, actor.handle, no_restart=True)

    async def remove(self, pool: PoolKey, worker_ids: Sequence[str]) -> None:
        self._start_drain(worker_ids)

    def _start_drain(self, worker_ids: Sequence[str]) -> None:
        for worker_id in worker_ids:
            actor = self._actors.get(worker_id)
            if actor is None or actor.state is WorkerState.DRAINING:
                continue
            actor.state = WorkerState.DRAINING
            # Not awaited: a drain queued on an actor that is still being placed
            # runs once it has started its worker, which then drains at once.
            asyncio.get_running_loop().create_task(self._drain(actor))
            log.info("draining worker %s", worker_id)

    async def _drain(self, actor: _Actor) -> None:
        try:
            await actor.handle.drain.remote(self.settings.kill_after_s)
        except Exception as exc:  # the poller sees what became of it
            log.warning("worker %s: drain not delivered: %s", actor.worker_id, exc)

    def worker_seconds(self) -> float:
        now = time.monotonic()
        return self._used_s + sum(now - a.started_at for a in self._actors.values())

    async def aclose(self, *, stop_workers: bool = True) -> None:
        import ray

        actors = list(self._actors.values())
        if stop_workers:
            self._start_drain([a.worker_id for a in actors])
            followers = [a.follower for a in actors if a.follower is not None]
            if followers:
                await asyncio.wait(followers, timeout=self.settings.kill_after_s + 5)
            for actor in list(self._actors.values()):  # never placed, or not answering
                log.warning("worker %s did not stop: its actor is killed", actor.worker_id)
                await self._release(actor)
        for actor in actors:
            if actor.follower is not None:
                actor.follower.cancel()
        if ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)


async def _in_daemon_thread(fn: Callable[[], object], timeout: float) -> None:
    """`fn()` in a daemon thread, waited for up to `timeout`: ray.init retries an
    unreachable address for many minutes and cannot be cancelled, and a thread of
    asyncio's executor would hold up the planner's exit until it gave up."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if done.done():  # timed out meanwhile
            return
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)

    def run() -> None:
        outcome: BaseException | None = None
        try:
            fn()
        except BaseException as exc:
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="ray-init", daemon=True).start()
    await asyncio.wait_for(done, timeout)


def pool_of(worker_id: str) -> PoolKey | None:
    """The pool in a worker id (`new_worker_id`: ``<model>-<role>-<token>``)."""
    model, _, rest = worker_id.rpartition("-")[0].rpartition("-")
    try:
        return PoolKey(model, WorkerRole(rest)) if model else None
    except ValueError:
        return None


def _drop_thread_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


def make_ray_connector(config: PlannerConfig) -> RayConnector:
    return RayConnector(config, ray_settings(config))
