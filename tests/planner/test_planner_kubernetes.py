"""The `kubernetes` planner connector and the manifests of deploy/kubernetes/.

No API server runs here. The connector talks, through the real `kubernetes`
client, to a small HTTP server on 127.0.0.1 that answers the paths it calls with
bodies recorded from the API (tests/planner/kubernetes_responses/) and records
every request. The manifests are checked against the client's model classes:
each document must deserialize into the model of its kind, and every key must be
a field of that model (a kubeconform-style schema check).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from dynamo_gateway import cli
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.planner.config import PlannerConfig, load_config
from dynamo_gateway.planner.connector import WorkerSpec, WorkerState
from dynamo_gateway.planner.connectors.kubernetes import (
    DELETION_COST,
    MERGE_PATCH,
    KubernetesConnector,
    PodView,
    deployment_name,
    label_selector,
    parse_settings,
    pod_state,
)
from dynamo_gateway.planner.observe import PoolKey
from dynamo_gateway.protocol.engine import WorkerRole

RESPONSES = Path(__file__).parent / "kubernetes_responses"
MANIFESTS = Path(__file__).parents[2] / "deploy" / "kubernetes"
NS = "dynamo"
DECODE = PoolKey("demo", WorkerRole.DECODE)
PREFILL = PoolKey("demo", WorkerRole.PREFILL)
POD = "demo-decode-6c8f7d9b54-{}".format  # the recorded decode pods: POD("k4d9w")
DECODE_SELECTOR = (
    "app.kubernetes.io/component=worker,app.kubernetes.io/name=dynamo-gateway,"
    "dynamo-gateway/model=demo,dynamo-gateway/role=decode"
)
NOW = datetime(2025, 6, 1, 12, 10, tzinfo=UTC).timestamp()  # just after the recorded polls


def recorded(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESPONSES / name).read_text())
    return data


# -- a recorded API server ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    content_type: str | None


class FakeApiServer:
    """Answers the API paths the connector calls from recorded bodies.

    The scale subresource is kept as state so PATCHes change it (with the API's
    resourceVersion precondition); `fail_next` queues error responses per
    (method, path).
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.deployments = {
            n: recorded(f"deployment-{n}.json") for n in ("demo-decode", "demo-prefill")
        }
        self.scales = {"demo-decode": recorded("scale-demo-decode.json")}
        self.pods: dict[str, dict[str, Any]] = {}  # labelSelector -> PodList
        for name, deployment in self.deployments.items():
            labels = deployment["spec"]["selector"]["matchLabels"]
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            self.pods[selector] = recorded(f"pods-{name}.json")
        self.fail_next: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()

    def fail(self, method: str, path: str, status: int, body: dict[str, Any]) -> None:
        with self._lock:
            self.fail_next.setdefault((method, path), []).append((status, body))

    def since(self, start: int, method: str | None = None) -> list[Request]:
        return [r for r in self.requests[start:] if method is None or r.method == method]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve()

            def do_PATCH(self) -> None:
                self._serve()

            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                request = Request(
                    self.command, url.path, parse_qs(url.query),
                    json.loads(raw) if raw else None, self.headers.get("Content-Type"),
                )  # fmt: skip
                with server._lock:
                    server.requests.append(request)
                    status, body = server._answer(request)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def _answer(self, r: Request) -> tuple[int, dict[str, Any]]:
        queued = self.fail_next.get((r.method, r.path))
        if queued:
            return queued.pop(0)
        apps = re.fullmatch(rf"/apis/apps/v1/namespaces/{NS}/deployments/([^/]+)(/scale)?", r.path)
        core = re.fullmatch(rf"/api/v1/namespaces/{NS}/pods(?:/([^/]+))?", r.path)
        if apps and not apps[2] and r.method == "GET" and apps[1] in self.deployments:
            return 200, self.deployments[apps[1]]
        if apps and apps[2] and apps[1] in self.scales:
            scale = self.scales[apps[1]]
            if r.method == "PATCH":
                version = r.body.get("metadata", {}).get("resourceVersion")
                if version is not None and version != scale["metadata"]["resourceVersion"]:
                    return 409, recorded("status-409-scale.json")
                scale["spec"]["replicas"] = r.body["spec"]["replicas"]
                scale["metadata"]["resourceVersion"] = str(
                    int(scale["metadata"]["resourceVersion"]) + 1
                )
            return 200, scale
        if core and core[1] is None and r.method == "GET":
            selector = r.query.get("labelSelector", [""])[0]
            return 200, self.pods.get(selector, {"kind": "PodList", "apiVersion": "v1",
                                                 "metadata": {}, "items": []})  # fmt: skip
        if core and core[1] is not None and r.method == "PATCH":
            for pods in self.pods.values():
                for pod in pods["items"]:
                    if pod["metadata"]["name"] == core[1]:
                        annotations = pod["metadata"].setdefault("annotations", {})
                        for key, value in r.body["metadata"]["annotations"].items():
                            if value is None:
                                annotations.pop(key, None)
                            else:
                                annotations[key] = value
                        return 200, {"kind": "Pod", "apiVersion": "v1", **pod}
        return 404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                     "message": f"the server could not find the requested resource ({r.path})",
                     "reason": "NotFound", "details": {}, "code": 404}  # fmt: skip

    def drop_pod(self, name: str) -> None:
        with self._lock:
            for pods in self.pods.values():
                pods["items"] = [p for p in pods["items"] if p["metadata"]["name"] != name]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def planner_config(api_url: str, model: str = "demo", **settings: Any) -> PlannerConfig:
    pools = {"prefill": {"min": 0}, "decode": {"min": 1}}
    if model != "demo":
        pools = {"aggregated": {"min": 1}}
    return PlannerConfig(
        connector="kubernetes",
        models=[{"name": model, "path": f"/models/{model}", "engine": "mocker", "pools": pools}],
        plugin_config={
            "kubernetes": {"api_url": api_url, "namespace": NS, "poll_interval_s": 3600, **settings}
        },
    )


@pytest.fixture
async def connected(api: FakeApiServer) -> AsyncIterator[tuple[KubernetesConnector, Clock]]:
    clock = Clock()
    connector = KubernetesConnector(planner_config(api.url), clock=clock, monotonic=lambda: 1000.0)
    await connector.start()
    try:
        yield connector, clock
    finally:
        await connector.aclose()


def states(connector: KubernetesConnector) -> dict[str, WorkerState]:
    return {w.worker_id: w.state for w in connector.managed()}


# -- the connector against recorded responses --------------------------------------------


async def test_start_reads_each_deployment_and_lists_its_pods_by_its_selector(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock]
) -> None:
    gets = [(r.method, r.path) for r in api.requests]
    assert gets[:2] == [
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/demo-prefill"),
        ("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/demo-decode"),
    ]
    lists = [r.query["labelSelector"][0] for r in api.requests if r.path.endswith("/pods")]
    assert DECODE_SELECTOR in lists
    assert {s.rsplit("=", 1)[1] for s in lists} == {"prefill", "decode"}


async def test_managed_maps_pod_phases_to_worker_states(
    connected: tuple[KubernetesConnector, Clock],
) -> None:
    connector, _ = connected
    assert states(connector) == {
        POD("2xk7p"): WorkerState.STARTING,  # Pending, unschedulable
        POD("8mqzt"): WorkerState.STARTING,  # Pending, ContainerCreating
        POD("k4d9w"): WorkerState.RUNNING,  # Running and Ready
        POD("r7vnc"): WorkerState.STARTING,  # Running, readiness not passed yet
        POD("w5hbs"): WorkerState.DRAINING,  # deletionTimestamp set
        "demo-prefill-5b7c9d8f6d-q4w9z": WorkerState.RUNNING,
    }  # the Failed (evicted) pod 9tjgx is no worker
    pools = {w.worker_id: w.pool for w in connector.managed()}
    assert pools[POD("k4d9w")] == DECODE
    assert pools["demo-prefill-5b7c9d8f6d-q4w9z"] == PREFILL
    started = {w.worker_id: w.started_at for w in connector.managed()}
    # The monotonic clock reads 1000 "now" (12:10:00); k4d9w started at 12:00:00.
    assert started[POD("k4d9w")] == pytest.approx(1000.0 - 600)
    assert started[POD("2xk7p")] == pytest.approx(1000.0)  # no startTime: first seen


async def test_worker_seconds_run_from_start_time_until_the_pod_is_gone(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock]
) -> None:
    connector, clock = connected
    # 12:10:00 - startTime: 8mqzt 30, k4d9w 600, r7vnc 120, w5hbs 1200, prefill 300;
    # 2xk7p has no startTime (first seen now): 0. The evicted pod never counts.
    assert connector.worker_seconds() == pytest.approx(2250.0)
    clock.now += 60
    api.drop_pod(POD("w5hbs"))  # drained and gone
    await connector.refresh()
    assert POD("w5hbs") not in states(connector)
    assert connector.worker_seconds() == pytest.approx(2250.0 + 6 * 60)
    clock.now += 60  # the gone pod no longer adds up
    assert connector.worker_seconds() == pytest.approx(2250.0 + 6 * 60 + 5 * 60)


async def test_add_patches_the_scale_subresource_to_replicas_plus_count(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock]
) -> None:
    connector, _ = connected
    config = planner_config(api.url)
    start = len(api.requests)
    ids = await connector.add(WorkerSpec.for_pool(config, config.model("demo"), DECODE), 2)
    assert ids == []  # the ReplicaSet names the pods; they show at the next poll
    scale = f"/apis/apps/v1/namespaces/{NS}/deployments/demo-decode/scale"
    assert [(r.method, r.path) for r in api.since(start)] == [("GET", scale), ("PATCH", scale)]
    patch = api.since(start, "PATCH")[0]
    assert patch.content_type == MERGE_PATCH == "application/merge-patch+json"
    assert patch.body == {"metadata": {"resourceVersion": "48213"}, "spec": {"replicas": 6}}
    assert api.scales["demo-decode"]["spec"]["replicas"] == 6


async def test_a_scale_conflict_is_read_again_and_retried_once(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock]
) -> None:
    connector, _ = connected
    scale = f"/apis/apps/v1/namespaces/{NS}/deployments/demo-decode/scale"
    api.fail("PATCH", scale, 409, recorded("status-409-scale.json"))
    start = len(api.requests)
    config = planner_config(api.url)
    await connector.add(WorkerSpec.for_pool(config, config.model("demo"), DECODE), 1)
    assert [r.method for r in api.since(start)] == ["GET", "PATCH", "GET", "PATCH"]
    assert api.scales["demo-decode"]["spec"]["replicas"] == 5


def test_the_clients_own_patch_type_for_a_dict_is_strategic_merge(api: FakeApiServer) -> None:
    """What the client sends when not told (the connector always tells it)."""
    from kubernetes import client

    api_client = client.ApiClient(client.Configuration(host=api.url))
    try:
        client.AppsV1Api(api_client).patch_namespaced_deployment_scale(
            "demo-decode", NS, {"spec": {"replicas": 1}}
        )
    finally:
        api_client.close()
    assert api.requests[-1].content_type == "application/strategic-merge-patch+json"


async def test_remove_annotates_exactly_the_victims_before_scaling_down(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock]
) -> None:
    connector, _ = connected
    victims = [POD("k4d9w"), POD("r7vnc")]
    start = len(api.requests)
    await connector.remove(DECODE, victims)
    sent = api.since(start)
    pods = f"/api/v1/namespaces/{NS}/pods/"
    scale = f"/apis/apps/v1/namespaces/{NS}/deployments/demo-decode/scale"
    assert [(r.method, r.path) for r in sent] == [
        ("PATCH", pods + victims[0]),
        ("PATCH", pods + victims[1]),
        ("GET", scale),
        ("PATCH", scale),
    ]
    for r in sent[:2]:
        assert r.content_type == MERGE_PATCH
        assert r.body == {"metadata": {"annotations": {DELETION_COST: "-1000"}}}
    assert sent[3].body["spec"] == {"replicas": 2}
    assert states(connector)[victims[0]] is WorkerState.DRAINING
    assert states(connector)[victims[1]] is WorkerState.DRAINING
    assert states(connector)[POD("8mqzt")] is WorkerState.STARTING  # not a victim
    # Draining ones and ids of other pools are not drained (again).
    start = len(api.requests)
    await connector.remove(DECODE, [victims[0], POD("w5hbs"), "demo-prefill-5b7c9d8f6d-q4w9z"])
    assert api.since(start) == []


async def test_a_victim_already_gone_is_not_counted_in_the_scale_down(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock]
) -> None:
    connector, _ = connected
    gone = POD("r7vnc")
    api.fail("PATCH", f"/api/v1/namespaces/{NS}/pods/{gone}", 404, recorded("status-404-pod.json"))
    await connector.remove(DECODE, [POD("k4d9w"), gone])
    assert api.requests[-1].body["spec"] == {"replicas": 3}
    assert states(connector)[gone] is WorkerState.STARTING


async def test_a_failed_scale_down_takes_the_annotations_back(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock], caplog: Any
) -> None:
    connector, _ = connected
    scale = f"/apis/apps/v1/namespaces/{NS}/deployments/demo-decode/scale"
    api.fail("PATCH", scale, 500, recorded("status-500.json"))
    start = len(api.requests)
    with caplog.at_level(logging.WARNING):
        await connector.remove(DECODE, [POD("k4d9w")])
    assert "HTTP 500: etcdserver: request timed out" in caplog.text
    last = api.since(start)[-1]
    assert (last.method, last.path) == ("PATCH", f"/api/v1/namespaces/{NS}/pods/{POD('k4d9w')}")
    assert last.body == {"metadata": {"annotations": {DELETION_COST: None}}}  # removes it
    assert states(connector)[POD("k4d9w")] is WorkerState.RUNNING


async def test_a_missing_deployment_is_a_config_error_at_start(api: FakeApiServer) -> None:
    api.fail(
        "GET",
        f"/apis/apps/v1/namespaces/{NS}/deployments/ghost-aggregated",
        404,
        recorded("status-404-deployment.json"),
    )
    connector = KubernetesConnector(planner_config(api.url, model="ghost"))
    with pytest.raises(ConfigError, match=rf"'ghost-aggregated' in namespace '{NS}'.*not exist"):
        await connector.start()
    await connector.aclose()


async def test_an_api_error_during_a_poll_is_logged_and_the_next_poll_recovers(
    api: FakeApiServer, connected: tuple[KubernetesConnector, Clock], caplog: Any
) -> None:
    connector, _ = connected
    before = states(connector)
    for _ in range(2):  # both pools' lists fail once
        api.fail("GET", f"/api/v1/namespaces/{NS}/pods", 500, recorded("status-500.json"))
    api.drop_pod(POD("w5hbs"))
    with caplog.at_level(logging.WARNING):
        await connector.refresh()
    assert f"cannot list the pods of {NS}/demo-decode: HTTP 500: etcdserver" in caplog.text
    assert states(connector) == before  # the last poll stays
    await connector.refresh()
    assert POD("w5hbs") not in states(connector)
    assert POD("k4d9w") in states(connector)


async def test_the_background_poll_follows_the_pods_through_errors(api: FakeApiServer) -> None:
    connector = KubernetesConnector(planner_config(api.url, poll_interval_s=0.02))
    await connector.start()
    try:
        assert POD("w5hbs") in states(connector)
        for _ in range(3):
            api.fail("GET", f"/api/v1/namespaces/{NS}/pods", 500, recorded("status-500.json"))
        api.drop_pod(POD("w5hbs"))
        await wait_for(lambda: POD("w5hbs") not in states(connector))
    finally:
        await connector.aclose()


async def test_an_unreachable_api_server_is_logged_not_raised(api: FakeApiServer) -> None:
    connector = KubernetesConnector(planner_config(api.url))
    await connector.start()
    try:
        before = states(connector)
        api.close()  # the API server goes away
        await connector.refresh()
        config = planner_config(api.url)
        await connector.add(WorkerSpec.for_pool(config, config.model("demo"), DECODE), 1)
        assert states(connector) == before  # the last poll stays
    finally:
        await connector.aclose()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"namespace": "Not_A_Label"}, "not a DNS-1123 label"),
        ({"replicas": 3}, "Extra inputs are not permitted"),
        ({"poll_interval_s": 0}, "greater than 0"),
        ({"deployment": "{model}-{pool}"}, "may name only"),
        ({"api_url": "localhost:8001"}, "not an http"),
        ({"api_url": "http://127.0.0.1:8001", "kubeconfig": "/k"}, "exclude each other"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"plugin_config\.kubernetes") as info:
        parse_settings(settings)
    assert message in str(info.value)


def test_two_pools_on_one_deployment_name_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="both map to Deployment 'demo'"):
        KubernetesConnector(planner_config("http://127.0.0.1:1", deployment="{model}"))


@pytest.mark.parametrize(
    ("phase", "ready", "deleting", "state"),
    [
        ("Pending", False, False, WorkerState.STARTING),
        ("Running", False, False, WorkerState.STARTING),
        ("Unknown", False, False, WorkerState.STARTING),
        ("Running", True, False, WorkerState.RUNNING),
        ("Running", True, True, WorkerState.DRAINING),  # SIGTERM before readiness notices
        ("Pending", False, True, WorkerState.DRAINING),
        ("Succeeded", False, False, None),
        ("Failed", False, True, None),
    ],
)
def test_pod_state(phase: str, ready: bool, deleting: bool, state: WorkerState | None) -> None:
    assert pod_state(PodView("p", phase, ready, deleting, None)) is state


def test_deployment_names_are_dns_1123_labels() -> None:
    assert deployment_name("{model}-{role}", DECODE) == "demo-decode"
    odd = PoolKey("Llama-3.1_8B/Instruct", WorkerRole.PREFILL)
    assert deployment_name("{model}-{role}", odd) == "llama-3-1-8b-instruct-prefill"
    long = deployment_name("{model}-{role}", PoolKey("m" * 62 + ".x", WorkerRole.DECODE))
    assert len(long) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", long)
    with pytest.raises(ConfigError, match="empty name"):
        deployment_name("{model}", PoolKey("...", WorkerRole.DECODE))


def test_label_selector_from_match_labels_and_expressions() -> None:
    assert label_selector({"b": "2", "a": "1"}, []) == "a=1,b=2"
    expressions = [("tier", "In", ["x", "y"]), ("old", "NotIn", ["z"]), ("gpu", "Exists", [])]
    assert (
        label_selector({"a": "1"}, [*expressions, ("spot", "DoesNotExist", [])])
        == "a=1,tier in (x,y),old notin (z),gpu,!spot"
    )
    with pytest.raises(ConfigError, match="empty selector"):
        label_selector({}, [])


def test_the_registered_connector_builds_this_one() -> None:
    from dynamo_gateway.plugins import load_plugins

    factory = load_plugins(entry_points=False).registry.planner_connectors.get("kubernetes")
    assert isinstance(factory(planner_config("http://127.0.0.1:1")), KubernetesConnector)


# -- the manifests ------------------------------------------------------------------------

MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "Service"): "V1Service",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
}
_SCALARS = {"str", "int", "float", "bool", "bytes", "datetime", "date", "object"}


def unknown_fields(value: Any, type_name: str, where: str) -> list[str]:
    """Keys of `value` that are no field of the client's model `type_name`, recursively."""
    if m := re.fullmatch(r"List\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{where}: a list expected"]
        return [p for i, v in enumerate(value) for p in unknown_fields(v, m[1], f"{where}[{i}]")]
    if m := re.fullmatch(r"Dict\[str, (.+)\]", type_name):
        if not isinstance(value, dict):
            return [f"{where}: a map expected"]
        return [p for k, v in value.items() for p in unknown_fields(v, m[1], f"{where}.{k}")]
    if type_name in _SCALARS:
        return []
    from kubernetes import client

    model = getattr(client, type_name)
    if not isinstance(value, dict):
        return [f"{where}: an object ({type_name}) expected"]
    fields = {wire: model.openapi_types[attr] for attr, wire in model.attribute_map.items()}
    problems: list[str] = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{where}.{key}: no field of {type_name}")
        else:
            problems += unknown_fields(item, fields[key], f"{where}.{key}")
    return problems


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{i}", doc))
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def workloads() -> list[dict[str, Any]]:
    return of_kind("Deployment") + of_kind("StatefulSet")


def workers() -> list[dict[str, Any]]:
    return [
        d
        for d in of_kind("Deployment")
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == "worker"
    ]


def container_args(workload: dict[str, Any]) -> list[str]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    args: list[str] = [*container.get("command", [])[1:], *container.get("args", [])]
    return args


def test_every_manifest_is_a_known_kind_with_only_known_fields() -> None:
    from kubernetes import client

    api = client.ApiClient()
    try:
        found = documents()
        assert found
        for where, doc in found:
            kind = (str(doc.get("apiVersion")), str(doc.get("kind")))
            model = MODELS.get(kind)
            assert model is not None, f"{where}: unexpected kind {kind}"
            obj = api.deserialize(json.dumps(doc), model, "application/json")  # types checked
            assert type(obj).__name__ == model
            assert unknown_fields(doc, model, where) == []
    finally:
        api.close()


def test_the_field_check_catches_a_misspelt_key() -> None:
    doc = copy.deepcopy(workers()[0])
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    doc["spec"]["replica"] = 2
    assert unknown_fields(doc, "V1Deployment", "d") == [
        "d.spec.template.spec.containers[0].readinesProbe: no field of V1Container",
        "d.spec.replica: no field of V1DeploymentSpec",
    ]


def test_namespaced_objects_are_in_the_namespace() -> None:
    [namespace] = of_kind("Namespace")
    name = namespace["metadata"]["name"]
    for where, doc in documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == name, where


def test_pod_templates_match_their_selectors_and_services_select_pods() -> None:
    templates = []
    for workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
        templates.append(workload["spec"]["template"])
    for service in of_kind("Service"):
        selected = [
            t
            for t in templates
            if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()
        ]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        ports = {p["name"] for t in selected for c in t["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)


def test_worker_pods_drain_within_their_grace_and_take_the_pod_name_as_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = workers()
    assert {d["spec"]["template"]["metadata"]["labels"]["dynamo-gateway/role"] for d in found} == {
        "aggregated",
        "prefill",
        "decode",
    }
    for deployment in found:
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
        assert fields["DYNAMO_GATEWAY_WORKER__WORKER_ID"] == "metadata.name"
        assert fields["DYNAMO_GATEWAY_WORKER__ADVERTISE_HOST"] == "status.podIP"
        # The args go through the real CLI with the Downward API's values in the env.
        monkeypatch.setenv("DYNAMO_GATEWAY_WORKER__WORKER_ID", "demo-decode-6c8f7d9b54-k4d9w")
        monkeypatch.setenv("DYNAMO_GATEWAY_WORKER__ADVERTISE_HOST", "10.244.1.23")
        args = cli._parser().parse_args(container_args(deployment))
        settings = cli.settings_from_args(args)
        assert settings.worker.worker_id == "demo-decode-6c8f7d9b54-k4d9w"
        assert settings.worker.advertise_host == "10.244.1.23"
        assert settings.worker.host == "0.0.0.0"  # probes and peers reach it on the pod IP
        assert settings.runtime.discovery.startswith("etcd://")
        assert settings.runtime.events.startswith("nats://")
        if settings.worker.role != "aggregated":
            assert settings.disagg.kv_transport == "tcp"
        assert pod["terminationGracePeriodSeconds"] > settings.runtime.drain_timeout_s
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[container["readinessProbe"]["httpGet"]["port"]] == settings.worker.status_port
        assert ports[container["livenessProbe"]["httpGet"]["port"]] == settings.worker.status_port
        assert container["readinessProbe"]["httpGet"]["path"] == "/health"
        assert container["livenessProbe"]["httpGet"]["path"] == "/live"


def test_frontend_and_planner_commands_parse() -> None:
    for name in ("frontend", "planner"):
        [deployment] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == name]
        args = container_args(deployment)
        assert args[0] == name
        cli._parser().parse_args(args)  # exits (SystemExit) on an unknown flag


def planner_toml(tmp_path: Path) -> PlannerConfig:
    [configmap] = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "planner-config"]
    path = tmp_path / "planner.toml"
    path.write_text(configmap["data"]["planner.toml"])
    return load_config(path)


def test_the_planner_config_map_names_the_kubernetes_connector_and_every_worker_pool(
    tmp_path: Path,
) -> None:
    config = planner_toml(tmp_path)
    assert config.connector == "kubernetes"
    settings = parse_settings(config.plugin_config["kubernetes"])
    [namespace] = of_kind("Namespace")
    assert settings.namespace == namespace["metadata"]["name"]
    pools = {deployment_name(settings.deployment, k) for m in config.models for k in m.pool_keys()}
    assert pools == {d["metadata"]["name"] for d in workers()}
    for deployment in workers():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        args = cli._parser().parse_args(container_args(deployment))
        assert args.served_model_name == [labels["dynamo-gateway/model"]]
        assert args.role == labels["dynamo-gateway/role"]


def _verbs_used(requests: list[Request]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of each recorded request, as RBAC names them."""
    used = set()
    for r in requests:
        if m := re.fullmatch(r"/apis/([^/]+)/v1/namespaces/[^/]+/([^/]+)/[^/]+(/scale)?", r.path):
            resource = m[2] + (m[3] or "")
            used.add((m[1], resource, {"GET": "get", "PATCH": "patch"}[r.method]))
        elif m := re.fullmatch(r"/api/v1/namespaces/[^/]+/([^/]+)(/[^/]+)?", r.path):
            verb = {"GET": "get" if m[2] else "list", "PATCH": "patch"}[r.method]
            used.add(("", m[1], verb))
        else:
            raise AssertionError(f"unexpected API path {r.path}")
    return used


async def test_the_planner_role_grants_what_the_connector_calls(api: FakeApiServer) -> None:
    connector = KubernetesConnector(planner_config(api.url))
    await connector.start()
    try:
        config = planner_config(api.url)
        await connector.add(WorkerSpec.for_pool(config, config.model("demo"), DECODE), 1)
        await connector.remove(DECODE, [POD("k4d9w")])
        await connector.refresh()
    finally:
        await connector.aclose()
    used = _verbs_used(api.requests)
    assert used == {
        ("apps", "deployments", "get"),
        ("apps", "deployments/scale", "get"),
        ("apps", "deployments/scale", "patch"),
        ("", "pods", "list"),
        ("", "pods", "patch"),
    }
    [role] = of_kind("Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used <= granted
    assert not any("*" in g or "delete" in g for g in granted)  # it never deletes
    # The planner runs as the account the Role is bound to.
    [binding] = of_kind("RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    [planner] = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "planner"]
    account = planner["spec"]["template"]["spec"]["serviceAccountName"]
    assert {
        "kind": "ServiceAccount",
        "name": account,
        "namespace": role["metadata"]["namespace"],
    } in (binding["subjects"])
    assert account in {a["metadata"]["name"] for a in of_kind("ServiceAccount")}


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
