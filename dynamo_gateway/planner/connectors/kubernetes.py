"""The `kubernetes` connector: one Deployment per pool, scaled through the API.

Its settings are ``[plugin_config.kubernetes]`` in the planner file
(`KubernetesSettings`)::

    [plugin_config.kubernetes]
    namespace = "dynamo-gateway"
    deployment = "{model}-{role}"   # each pool's Deployment, made a DNS-1123 name
    poll_interval_s = 2

The Deployments exist before the planner starts (``deploy/kubernetes/``) and
their pod templates hold the worker command: a model's ``path``, ``engine`` and
``worker_args`` in the planner file do not reach these workers. A pod is one
worker and its worker id is the pod name (the manifests set ``worker.worker_id``
from ``metadata.name`` through the Downward API), so discovery, `managed()` and
the API name a worker the same way.

- `add` raises the Deployment's ``scale`` by ``count``. The ReplicaSet controller
  names the pods afterwards, so it returns no ids; the pods show in `managed()`
  (STARTING) from the next poll.
- `remove` drains exactly the chosen pods: each is annotated
  ``controller.kubernetes.io/pod-deletion-cost: "-1000"``, then ``scale`` drops
  by as many. The ReplicaSet deletes the cheapest pods first, the kubelet sends
  SIGTERM and the worker drains within ``terminationGracePeriodSeconds``. The
  ReplicaSet ranks phase and readiness above deletion cost, so a Pending or
  unready pod of the pool goes before a ready victim (the planner drains
  unregistered workers first, so the two agree as a rule); a victim that is
  spared stops showing as draining after `DRAIN_CONFIRM_S`.
- `managed()` and `worker_seconds()` read the last poll of each Deployment's
  pods (by the Deployment's own selector), taken every ``poll_interval_s`` in
  the background, so both stay synchronous and cheap.

API errors and an unreachable API server are logged and retried at the next
poll or planner interval; only `start()` fails (`ConfigError`), when a
Deployment is missing or cannot be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import PlannerConfig
from dynamo_gateway.planner.connector import ManagedWorker, WorkerSpec, WorkerState
from dynamo_gateway.planner.observe import PoolKey

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
VICTIM_COST = "-1000"
# Named rather than left to the client, whose guess depends on the body (a dict
# goes as a strategic merge patch in v37) and has changed between releases. A JSON
# merge patch (RFC 7386) means the same on every resource, and null drops a key.
MERGE_PATCH = "application/merge-patch+json"
DRAIN_CONFIRM_S = 30.0  # a victim still without deletionTimestamp this long after was spared
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class KubernetesSettings(BaseModel):
    """``[plugin_config.kubernetes]``: where the pools' Deployments are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(
        None,
        description="the Deployments' namespace (default: the planner pod's own, else default)",
    )
    deployment: str = Field(
        "{model}-{role}",
        description="a pool's Deployment: {model} and {role} filled in, made a DNS-1123 label",
    )
    api_url: str | None = Field(
        None, description="an API server used without credentials (`kubectl proxy`, tests)"
    )
    kubeconfig: Path | None = Field(
        None, description="kubeconfig file (default: in-cluster inside a pod, else ~/.kube/config)"
    )
    context: str | None = Field(None, description="kubeconfig context (default: its current one)")
    poll_interval_s: float = Field(2.0, gt=0, description="how often the pods are listed")
    request_timeout_s: float = Field(10.0, gt=0, description="limit on one API request")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.match(value):
            raise ValueError(f"namespace {value!r} is not a DNS-1123 label")
        return value

    @field_validator("deployment")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(model="m", role="r")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"deployment template {value!r} may name only {{model}} and {{role}} ({exc!r})"
            ) from None
        return value

    @field_validator("api_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"api_url {value!r} is not an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> KubernetesSettings:
        if self.api_url is not None and (self.kubeconfig is not None or self.context is not None):
            raise ValueError("api_url and kubeconfig/context exclude each other")
        return self


def parse_settings(raw: Mapping[str, Any]) -> KubernetesSettings:
    try:
        return KubernetesSettings.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(f"invalid [plugin_config.kubernetes]: {exc}") from None


def deployment_name(template: str, pool: PoolKey) -> str:
    """The pool's Deployment: the template filled in, lower-cased, every run of other
    characters made one ``-``, cut to 63 characters (a DNS-1123 label)."""
    raw = template.format(model=pool.model, role=pool.role.value).lower()
    name = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")[:63].strip("-")
    if not name:
        raise ConfigError(f"pool {pool}: deployment template {template!r} gives an empty name")
    return name


def label_selector(
    match_labels: Mapping[str, str], match_expressions: Sequence[tuple[str, str, Sequence[str]]]
) -> str:
    """A Deployment's ``spec.selector`` as the ``labelSelector`` query of a pod list."""
    parts = [f"{key}={value}" for key, value in sorted(match_labels.items())]
    for key, operator, values in match_expressions:
        joined = ",".join(values)
        if operator == "In":
            parts.append(f"{key} in ({joined})")
        elif operator == "NotIn":
            parts.append(f"{key} notin ({joined})")
        elif operator == "Exists":
            parts.append(key)
        elif operator == "DoesNotExist":
            parts.append(f"!{key}")
        else:
            raise ConfigError(f"unknown label selector operator {operator!r} on {key!r}")
    if not parts:
        # An empty selector would list every pod of the namespace.
        raise ConfigError("a Deployment with an empty selector")
    return ",".join(parts)


@dataclass(frozen=True)
class PodView:
    """What the connector reads from a pod."""

    name: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool  # its Ready condition is True
    deleting: bool  # metadata.deletionTimestamp is set: SIGTERM sent or about to be
    start_time: float | None  # status.startTime (epoch seconds); None before the kubelet has it


def pod_state(pod: PodView) -> WorkerState | None:
    """The worker state of a pod; None once it has exited."""
    if pod.phase in ("Succeeded", "Failed"):
        return None
    if pod.deleting:
        return WorkerState.DRAINING
    if pod.phase == "Running" and pod.ready:
        return WorkerState.RUNNING
    return WorkerState.STARTING


def pod_view(pod: Any) -> PodView:
    """A `PodView` of a `kubernetes.client.V1Pod`."""
    meta, status = pod.metadata, pod.status
    conditions = (status.conditions if status is not None else None) or []
    started = status.start_time if status is not None else None
    return PodView(
        name=str(meta.name),
        phase=str((status.phase if status is not None else None) or "Pending"),
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        deleting=meta.deletion_timestamp is not None,
        start_time=started.timestamp() if started is not None else None,
    )


@dataclass
class _Worker:
    pool: PoolKey
    pod: PodView
    first_seen: float  # wall clock
    drain_asked: float | None = None  # wall clock of the remove() that chose it

    @property
    def started(self) -> float:
        return self.pod.start_time if self.pod.start_time is not None else self.first_seen

    @property
    def state(self) -> WorkerState:
        if self.drain_asked is not None:
            return WorkerState.DRAINING
        return pod_state(self.pod) or WorkerState.DRAINING


def _describe(exc: BaseException) -> str:
    """One line for a log: an API error's status and its Status message."""
    status = getattr(exc, "status", None)
    if status is None:
        return f"{type(exc).__name__}: {exc}"
    message = str(getattr(exc, "reason", "") or "")
    with contextlib.suppress(TypeError, ValueError, KeyError):
        message = str(json.loads(getattr(exc, "body", None) or "")["message"])
    return f"HTTP {status}: {message}"


def _own_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _new_client(settings: KubernetesSettings) -> Any:
    from kubernetes import client
    from kubernetes import config as kube_config

    if settings.api_url is not None:
        return client.ApiClient(client.Configuration(host=settings.api_url.rstrip("/")))
    try:
        if settings.kubeconfig is None and settings.context is None:
            configuration = client.Configuration()
            try:
                kube_config.load_incluster_config(client_configuration=configuration)
                return client.ApiClient(configuration)
            except kube_config.ConfigException:
                pass  # not in a pod: the default kubeconfig
        # persist_config=False: never write refreshed tokens back into the user's file.
        return kube_config.new_client_from_config(
            config_file=str(settings.kubeconfig) if settings.kubeconfig is not None else None,
            context=settings.context,
            persist_config=False,
        )
    except (kube_config.ConfigException, OSError) as exc:
        raise ConfigError(f"kubernetes connector: no usable cluster configuration: {exc}") from None


class KubernetesConnector:
    def __init__(
        self,
        config: PlannerConfig,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        self.settings = parse_settings(config.plugin_config.get("kubernetes", {}))
        self.deployments: dict[PoolKey, str] = {}
        for model in config.models:
            for key in model.pool_keys():
                name = deployment_name(self.settings.deployment, key)
                other = next((k for k, n in self.deployments.items() if n == name), None)
                if other is not None:
                    raise ConfigError(
                        f"pools {other} and {key} both map to Deployment {name!r}: "
                        "change [plugin_config.kubernetes] deployment"
                    )
                self.deployments[key] = name
        self.namespace = self.settings.namespace or "default"
        self._api_exception: type[Exception] = ApiException
        # Everything a call can fail with that is worth a retry rather than a crash;
        # ValueError covers a response the client's models cannot read.
        self._errors: tuple[type[BaseException], ...] = (
            ApiException, urllib3.exceptions.HTTPError, OSError, ValueError,
        )  # fmt: skip
        self._clock = clock
        self._monotonic = monotonic
        self._client: Any = None
        self._apps: Any = None
        self._core: Any = None
        self._selectors: dict[PoolKey, str] = {}
        self._workers: dict[str, _Worker] = {}
        self._used_s = 0.0  # worker-seconds of pods gone
        self._stop = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, read each pool's Deployment (its selector) and take a first poll."""
        from kubernetes import client

        if self.settings.namespace is None:
            self.namespace = await asyncio.to_thread(_own_namespace)
        self._client = await asyncio.to_thread(_new_client, self.settings)
        try:
            self._apps = client.AppsV1Api(self._client)
            self._core = client.CoreV1Api(self._client)
            for key, name in self.deployments.items():
                self._selectors[key] = await self._selector(key, name)
        except BaseException:
            self._close_client()
            raise
        await self.refresh()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())
        log.info(
            "kubernetes connector: %s in namespace %s, %d pods",
            ", ".join(f"{k}={n}" for k, n in self.deployments.items()),
            self.namespace, len(self._workers),
        )  # fmt: skip

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # The client is synchronous (urllib3); keep its calls off the event loop.
        return await asyncio.to_thread(
            method, *args, _request_timeout=self.settings.request_timeout_s, **kwargs
        )

    async def _selector(self, key: PoolKey, name: str) -> str:
        where = f"Deployment {name!r} in namespace {self.namespace!r} (pool {key})"
        try:
            deployment = await self._call(
                self._apps.read_namespaced_deployment, name, self.namespace
            )
        except self._api_exception as exc:
            status = getattr(exc, "status", None)
            if status == 404:
                raise ConfigError(
                    f"kubernetes connector: {where} does not exist; create it "
                    "(deploy/kubernetes/) or set [plugin_config.kubernetes] deployment"
                ) from None
            hint = "; check the planner's RBAC Role" if status in (401, 403) else ""
            raise ConfigError(
                f"kubernetes connector: cannot read {where}: {_describe(exc)}{hint}"
            ) from None
        except self._errors as exc:
            host = self._client.configuration.host
            raise ConfigError(
                f"kubernetes connector: cannot reach the API server at {host}: {_describe(exc)}"
            ) from None
        selector = deployment.spec.selector
        expressions = [
            (str(e.key), str(e.operator), [str(v) for v in e.values or []])
            for e in selector.match_expressions or []
        ]
        try:
            return label_selector(dict(selector.match_labels or {}), expressions)
        except ConfigError as exc:
            raise ConfigError(f"kubernetes connector: {where}: {exc}") from None

    async def _poll_forever(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.poll_interval_s)
            if self._stop.is_set():
                return
            try:
                await self.refresh()
            except Exception:
                log.exception("kubernetes connector: poll failed; trying again")

    async def refresh(self) -> None:
        """List each pool's pods once (the background poll calls this)."""
        for key, name in self.deployments.items():
            try:
                pods = await self._call(
                    self._core.list_namespaced_pod, self.namespace,
                    label_selector=self._selectors[key],
                )  # fmt: skip
                views = [pod_view(p) for p in pods.items or []]
            except self._errors as exc:
                log.warning(
                    "kubernetes connector: cannot list the pods of %s/%s: %s; "
                    "keeping the last poll", self.namespace, name, _describe(exc),
                )  # fmt: skip
                continue
            self._update(key, views)

    def _update(self, pool: PoolKey, pods: Sequence[PodView]) -> None:
        now = self._clock()
        seen: set[str] = set()
        for pod in pods:
            if pod_state(pod) is None:
                continue  # exited: it leaves below like a deleted one
            seen.add(pod.name)
            worker = self._workers.get(pod.name)
            if worker is None:
                self._workers[pod.name] = _Worker(pool, pod, first_seen=now)
                continue
            worker.pod = pod
            asked = worker.drain_asked
            if asked is not None and not pod.deleting and now - asked > DRAIN_CONFIRM_S:
                log.warning(
                    "kubernetes connector: pod %s was chosen for a drain but the ReplicaSet "
                    "removed another pod (it ranks unready pods first); it serves on", pod.name,
                )  # fmt: skip
                worker.drain_asked = None
        for name, worker in list(self._workers.items()):
            if worker.pool == pool and name not in seen:
                del self._workers[name]
                self._used_s += max(0.0, now - worker.started)

    def managed(self) -> list[ManagedWorker]:
        wall, mono = self._clock(), self._monotonic()
        return [
            ManagedWorker(name, w.pool, w.state, mono - (wall - w.started))
            for name, w in sorted(self._workers.items())
        ]

    async def add(self, spec: WorkerSpec, count: int) -> list[str]:
        """Raise the pool's replicas by `count`. Returns no ids: the ReplicaSet names
        the pods later, and they show in `managed()` from the next poll."""
        if count > 0:
            await self._scale(spec.pool, count)
        return []

    async def remove(self, pool: PoolKey, worker_ids: Sequence[str]) -> None:
        chosen: list[str] = []
        for worker_id in dict.fromkeys(worker_ids):
            worker = self._workers.get(worker_id)
            if worker is None or worker.pool != pool:
                log.warning(
                    "kubernetes connector: %s is no pod of %s; not drained", worker_id, pool
                )
            elif worker.state is not WorkerState.DRAINING:
                chosen.append(worker_id)
        # Every victim is marked before replicas drop: the ReplicaSet picks its
        # pods the moment it sees the new count.
        marked = [name for name in chosen if await self._set_cost(name, VICTIM_COST)]
        if not marked:
            return
        if not await self._scale(pool, -len(marked)):
            # Unmarked again, or a later scale-down would take these instead of its own.
            for name in marked:
                await self._set_cost(name, None)
            return
        now = self._clock()
        for name in marked:
            if (worker := self._workers.get(name)) is not None:
                worker.drain_asked = now
        log.info("kubernetes connector: draining %s of %s", ", ".join(marked), pool)

    async def _set_cost(self, pod: str, cost: str | None) -> bool:
        body = {"metadata": {"annotations": {DELETION_COST: cost}}}  # null removes it
        try:
            await self._call(
                self._core.patch_namespaced_pod, pod, self.namespace, body,
                _content_type=MERGE_PATCH,
            )  # fmt: skip
        except self._errors as exc:
            log.warning(
                "kubernetes connector: cannot annotate pod %s/%s: %s", self.namespace, pod,
                _describe(exc),
            )  # fmt: skip
            return False
        return True

    async def _scale(self, pool: PoolKey, delta: int) -> bool:
        """Change the pool's replicas by `delta`; False (logged) when it could not."""
        name = self.deployments.get(pool)
        if name is None:
            log.warning("kubernetes connector: no Deployment for pool %s", pool)
            return False
        for attempt in range(2):
            try:
                scale = await self._call(
                    self._apps.read_namespaced_deployment_scale, name, self.namespace
                )
                current = int(scale.spec.replicas or 0)
                replicas = max(0, current + delta)
                # The resourceVersion makes the write conditional: if someone else
                # scaled in between, the API answers 409 and we read again.
                body = {
                    "metadata": {"resourceVersion": scale.metadata.resource_version},
                    "spec": {"replicas": replicas},
                }
                await self._call(
                    self._apps.patch_namespaced_deployment_scale, name, self.namespace, body,
                    _content_type=MERGE_PATCH,
                )  # fmt: skip
            except self._errors as exc:
                if getattr(exc, "status", None) == 409 and attempt == 0:
                    continue
                log.warning(
                    "kubernetes connector: cannot scale %s/%s by %+d: %s; the planner tries "
                    "again next interval", self.namespace, name, delta, _describe(exc),
                )  # fmt: skip
                return False
            log.info(
                "kubernetes connector: %s/%s scaled %d -> %d", self.namespace, name, current,
                replicas,
            )  # fmt: skip
            return True
        return False  # pragma: no cover - the loop returns

    def worker_seconds(self) -> float:
        now = self._clock()
        return self._used_s + sum(max(0.0, now - w.started) for w in self._workers.values())

    async def aclose(self, *, stop_workers: bool = True) -> None:
        """Stop polling and close the API client; the Deployments stay as they are.

        `stop_workers` is ignored on purpose: in Kubernetes the fleet outlives the
        planner. A planner that restarts or is rescheduled must neither take the
        serving pods with it nor shrink the pools to their minimums; stop a pool
        with ``kubectl scale deployment NAME --replicas 0``.
        """
        self._stop.set()
        if self._poller is not None:
            # Not cancelled: a request in flight finishes (request_timeout_s at most)
            # before the client's connections are closed under it.
            await self._poller
            self._poller = None
        self._close_client()

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def make_kubernetes_connector(config: PlannerConfig) -> KubernetesConnector:
    return KubernetesConnector(config)
