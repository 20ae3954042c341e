"""The live status page (``GET /status``) and its data (``GET /status.json``).

The page is one HTML document with its CSS and script inline and nothing else
to load, so it works offline; its Content-Security-Policy allows only those two
inline blocks (by hash) and requests to this origin. The script polls
``status.json`` every second and updates the page in place, keyed by model and
worker id (rows persist across updates; text goes in through ``textContent``
only, so a model name or an error message is never read as HTML).

`status_report()` builds the data from the gateway's state: the served models
and their workers (load, KV usage), the router's prefix hit rate, request
counts, migrations, the recent errors (`RecentErrors`, kept by the `Gateway`)
and the planner's recent decisions (`ModelManager.planner_decisions`, from the
event plane). Like ``/metrics`` and ``/health`` it needs no API key.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dynamo_gateway.frontend.http import JSONBytes
from dynamo_gateway.runtime.events import PlannerDecision

if TYPE_CHECKING:
    from dynamo_gateway.frontend.app import Gateway
    from dynamo_gateway.runtime.pool import ModelPool

__all__ = [
    "ErrorRecord",
    "ModelStatus",
    "RecentErrors",
    "RouterStatus",
    "StatusReport",
    "WorkerStatus",
    "status_page",
    "status_report",
    "status_routes",
]

RECENT_ERRORS_KEPT = 50
MAX_MESSAGE_CHARS = 300  # an error message longer than this is cut (it may quote input)
MAX_MODEL_CHARS = 100  # the model name of a failed request is whatever the client sent


class ErrorRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One error a client got: when, for what, and the message it was sent."""

    time: float  # Unix seconds
    model: str  # "-" when the request failed before naming one
    endpoint: str
    status: int
    type: str  # the OpenAI error type
    message: str


class RecentErrors:
    """The last `size` errors sent to clients (a ring buffer).

    Only what the client was told goes in - status, type, message - never a
    request body or a header, so nothing here is a secret the client did not send.
    """

    def __init__(self, size: int = RECENT_ERRORS_KEPT, clock: Callable[[], float] = time.time):
        self._errors: deque[ErrorRecord] = deque(maxlen=size)
        self._clock = clock

    def add(self, model: str, endpoint: str, status: int, type_: str, message: str) -> None:
        self._errors.append(
            ErrorRecord(
                time=self._clock(),
                model=_cut(model, MAX_MODEL_CHARS),
                endpoint=endpoint,
                status=status,
                type=type_,
                message=_cut(message, MAX_MESSAGE_CHARS),
            )
        )

    def newest_first(self) -> list[ErrorRecord]:
        return list(reversed(self._errors))

    def __len__(self) -> int:
        return len(self._errors)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class WorkerStatus(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    role: str  # aggregated | prefill | decode
    state: str  # live | draining
    address: str
    active: int  # requests running on the worker (its report)
    waiting: int  # requests queued on the worker (its report)
    inflight: int  # this frontend's requests on it
    kv_used: int  # KV blocks
    kv_total: int


class RouterStatus(msgspec.Struct, frozen=True, kw_only=True):
    """The `kv` router's counters (routers without `stats()` have none)."""

    hit_rate: float  # matched / routed prompt blocks
    matched_blocks: int
    request_blocks: int
    decisions: int
    decision_p50_ms: float
    decision_p99_ms: float
    indexer_blocks: int


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    max_model_len: int
    router: str
    router_stats: RouterStatus | None
    workers: list[WorkerStatus]
    requests: dict[str, int]  # by HTTP status code
    inflight: int
    migrations: int
    remote_prefills: int


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    time: float
    started: int
    frontend_id: str
    models: list[ModelStatus]
    requests: dict[str, int]  # every model's (unknown ones too), by HTTP status code
    errors_by_type: dict[str, int]
    recent_errors: list[ErrorRecord]  # newest first
    planner: list[PlannerDecision]  # newest first


def status_report(gateway: Gateway, now: float | None = None) -> StatusReport:
    """The gateway's state now, as the page shows it."""
    manager = gateway.manager
    metrics = gateway.metrics
    by_model = _requests_by_model(metrics.requests)
    inflight = _gauge_by_model(metrics.inflight)
    totals: dict[str, int] = {}
    for counts in by_model.values():
        for code, n in counts.items():
            totals[code] = totals.get(code, 0) + n
    models = [
        ModelStatus(
            name=name,
            max_model_len=pool.card.max_model_len,
            router=gateway.settings.router_name,
            router_stats=_router_status(pool.router),
            workers=_workers(pool),
            requests=by_model.get(name, {}),
            inflight=inflight.get(name, 0),
            migrations=pool.migrations,
            remote_prefills=pool.remote_prefills,
        )
        for name, pool in sorted(manager.pools.items())
    ]
    return StatusReport(
        time=time.time() if now is None else now,
        started=gateway.started,
        frontend_id=manager.frontend_id,
        models=models,
        requests=dict(sorted(totals.items())),
        errors_by_type=_errors_by_type(metrics.errors),
        recent_errors=gateway.recent_errors.newest_first(),
        planner=list(reversed(manager.planner_decisions)),
    )


def _workers(pool: ModelPool) -> list[WorkerStatus]:
    out = []
    for state, handles in (
        ("live", pool.workers),
        ("live", pool.prefill_workers),
        ("draining", pool.draining),
    ):
        for wid, worker in sorted(handles.items()):
            worker.refresh_load()
            load = worker.view.load
            out.append(
                WorkerStatus(
                    worker_id=wid,
                    role=worker.record.role.value,
                    state=state,
                    address=worker.record.address,
                    active=load.active_requests,
                    waiting=load.waiting_requests,
                    inflight=worker.view.inflight,
                    kv_used=load.kv_blocks_used,
                    kv_total=load.kv_blocks_total or worker.record.kv_blocks_total,
                )
            )
    return out


def _router_status(router: object) -> RouterStatus | None:
    stats_of = getattr(router, "stats", None)
    if stats_of is None:
        return None
    st = stats_of()
    return RouterStatus(
        hit_rate=st.hit_rate,
        matched_blocks=st.matched_blocks,
        request_blocks=st.request_blocks,
        decisions=st.decisions,
        decision_p50_ms=st.decision_p50_s * 1000,
        decision_p99_ms=st.decision_p99_s * 1000,
        indexer_blocks=st.indexer_blocks,
    )


def _requests_by_model(requests: Counter) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for family in requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                counts = out.setdefault(s.labels["model"], {})
                code = s.labels["status"]
                counts[code] = counts.get(code, 0) + int(s.value)
    return out


def _gauge_by_model(gauge: Gauge) -> dict[str, int]:
    return {s.labels["model"]: int(s.value) for family in gauge.collect() for s in family.samples}


def _errors_by_type(errors: Counter) -> dict[str, int]:
    return {
        s.labels["type"]: int(s.value)
        for family in errors.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }


# -- the page ---------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light dark; --bg: #f6f7f9; --card: #fff; --fg: #1d2330; --mute: #667085;
  --line: #e3e6eb; --ok: #1a7f37; --warn: #b54708; --bad: #c4302b; --bar: #2f6feb; }
@media (prefers-color-scheme: dark) { :root { --bg: #0f1218; --card: #171b23; --fg: #e6e9ef;
  --mute: #98a2b3; --line: #2a303b; --ok: #3fb950; --warn: #d29922; --bad: #f85149;
  --bar: #4c8dff; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
  background: var(--bg); color: var(--fg); }
header { display: flex; align-items: baseline; gap: 16px; padding: 12px 20px;
  border-bottom: 1px solid var(--line); background: var(--card); }
h1 { font-size: 18px; margin: 0; }
h2 { font-size: 15px; margin: 0 0 8px; }
main { padding: 16px 20px; display: grid; gap: 16px; }
.mute { color: var(--mute); }
.conn::before { content: "\\25CF "; }
.conn.live { color: var(--ok); }
.conn.stale { color: var(--bad); }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; }
.tile { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 8px 14px; min-width: 120px; }
.tile b { display: block; font-size: 20px; font-variant-numeric: tabular-nums; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 14px; }
.facts { display: flex; flex-wrap: wrap; gap: 4px 18px; margin-bottom: 8px; }
.facts b { font-variant-numeric: tabular-nums; }
table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-top: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--mute); font-weight: 500; border-top: 0; }
td.num, th.num { text-align: right; }
td.msg { word-break: break-word; }
.bar { display: inline-block; width: 90px; height: 8px; border-radius: 4px;
  background: var(--line); vertical-align: middle; margin-right: 6px; overflow: hidden; }
.bar > span { display: block; height: 100%; background: var(--bar); }
.draining { color: var(--warn); }
.s4 { color: var(--warn); }
.s5 { color: var(--bad); }
.up { color: var(--ok); }
.down { color: var(--warn); }
.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 16px; }
.empty { color: var(--mute); margin: 4px 0 0; }
"""

_BODY = """
<header>
  <h1>dynamo-gateway status</h1>
  <span id="conn" class="conn">connecting</span>
  <span id="meta" class="mute"></span>
</header>
<main>
  <section class="tiles" id="summary">
    <div class="tile"><span class="mute">models</span><b id="n-models">-</b></div>
    <div class="tile"><span class="mute">workers</span><b id="n-workers">-</b></div>
    <div class="tile"><span class="mute">requests</span><b id="n-requests">-</b></div>
    <div class="tile"><span class="mute">errors (4xx/5xx)</span><b id="n-errors">-</b></div>
    <div class="tile"><span class="mute">in flight</span><b id="n-inflight">-</b></div>
    <div class="tile"><span class="mute">migrations</span><b id="n-migrations">-</b></div>
  </section>
  <section id="models"></section>
  <p id="no-models" class="empty">No model is served: no worker has registered yet.</p>
  <div class="two">
    <section class="card">
      <h2>Recent errors</h2>
      <table><thead><tr><th>time</th><th>model</th><th>status</th><th>type</th>
        <th>message</th></tr></thead><tbody id="errors"></tbody></table>
      <p id="no-errors" class="empty">None.</p>
    </section>
    <section class="card">
      <h2>Planner decisions</h2>
      <table><thead><tr><th>time</th><th>pool</th><th>change</th><th>reason</th></tr></thead>
        <tbody id="decisions"></tbody></table>
      <p id="no-decisions" class="empty">None seen by this frontend.</p>
    </section>
  </div>
</main>
"""

_JS = """
"use strict";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

// Keyed update: one child of `parent` per item, created once, updated in place,
// kept in the items' order, removed when its item is gone.
function sync(parent, items, key, make, update) {
  const old = new Map();
  for (const child of Array.from(parent.children)) old.set(child.dataset.key, child);
  let prev = null;
  for (const item of items) {
    const k = key(item);
    let node = old.get(k);
    if (node) old.delete(k);
    else { node = make(item); node.dataset.key = k; }
    update(node, item);
    const want = prev ? prev.nextSibling : parent.firstChild;
    if (node !== want) parent.insertBefore(node, want);
    prev = node;
  }
  for (const node of old.values()) node.remove();
}

function cells(tr, n, numeric) {
  for (let i = 0; i < n; i++) tr.appendChild(el("td", numeric.includes(i) ? "num" : ""));
  return tr;
}

function set(node, text, cls) {
  const s = String(text);
  if (node.textContent !== s) node.textContent = s;
  if (cls !== undefined && node.className !== cls) node.className = cls;
}

const pct = (x) => (100 * x).toFixed(1) + "%";
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
const sum = (o, pred) => Object.entries(o).reduce((a, [k, v]) => a + (pred(k) ? v : 0), 0);
const isError = (code) => Number(code) >= 400 && Number(code) !== 499;

function uptime(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

function makeModel(m) {
  const card = el("article", "card model");
  card.dataset.model = m.name;
  card.appendChild(el("h2", "name", m.name));
  card.appendChild(el("div", "facts"));
  const table = el("table", "workers");
  const head = el("tr");
  for (const [t, num] of [["worker", 0], ["role", 0], ["state", 0], ["active", 1],
                          ["waiting", 1], ["in flight", 1], ["KV blocks", 0]]) {
    head.appendChild(el("th", num ? "num" : "", t));
  }
  table.appendChild(el("thead")).appendChild(head);
  table.appendChild(el("tbody"));
  card.appendChild(table);
  return card;
}

function fact(label, value) {
  const span = el("span", "mute", label + " ");
  span.appendChild(el("b", "", value));
  return span;
}

function updateModel(card, m) {
  const r = m.requests;
  const facts = [
    fact("requests", sum(r, () => true)),
    fact("ok", sum(r, (c) => c < 400)),
    fact("4xx", sum(r, (c) => c >= 400 && c < 500 && Number(c) !== 499)),
    fact("5xx", sum(r, (c) => c >= 500)),
    fact("in flight", m.inflight),
    fact("migrations", m.migrations),
    fact("router", m.router),
  ];
  if (m.remote_prefills) facts.push(fact("remote prefills", m.remote_prefills));
  const st = m.router_stats;
  if (st) {
    facts.push(fact("prefix hit rate", pct(st.hit_rate)));
    facts.push(fact("matched blocks", `${st.matched_blocks} / ${st.request_blocks}`));
    facts.push(fact("decision p99", st.decision_p99_ms.toFixed(2) + " ms"));
  }
  const box = card.querySelector(".facts");
  const text = facts.map((f) => f.textContent).join("|");
  if (box.dataset.text !== text) { box.replaceChildren(...facts); box.dataset.text = text; }
  sync(card.querySelector("tbody"), m.workers, (w) => w.worker_id, (w) => {
    const tr = cells(el("tr"), 7, [3, 4, 5]);
    tr.dataset.worker = w.worker_id;
    tr.title = w.address;
    const bar = el("span", "bar");
    bar.appendChild(el("span"));
    tr.cells[6].append(bar, el("span", "kv"));
    return tr;
  }, (tr, w) => {
    const c = tr.cells;
    set(c[0], w.worker_id);
    set(c[1], w.role);
    set(c[2], w.state, w.state === "draining" ? "draining" : "");
    set(c[3], w.active, "num");
    set(c[4], w.waiting, "num");
    set(c[5], w.inflight, "num");
    const use = w.kv_total ? w.kv_used / w.kv_total : 0;
    c[6].querySelector(".bar > span").style.width = pct(Math.min(use, 1));
    set(c[6].querySelector(".kv"), `${w.kv_used} / ${w.kv_total} (${pct(use)})`);
  });
}

function render(s) {
  const models = s.models;
  const workers = models.reduce((a, m) => a + m.workers.length, 0);
  set($("n-models"), models.length);
  set($("n-workers"), workers);
  set($("n-requests"), sum(s.requests, () => true));
  set($("n-errors"), sum(s.requests, isError));
  set($("n-inflight"), models.reduce((a, m) => a + m.inflight, 0));
  set($("n-migrations"), models.reduce((a, m) => a + m.migrations, 0));
  set($("meta"), `frontend ${s.frontend_id} \\u00b7 up ${uptime(s.time - s.started)}`);
  $("no-models").hidden = models.length > 0;
  sync($("models"), models, (m) => m.name, makeModel, updateModel);

  const errs = s.recent_errors;
  $("no-errors").hidden = errs.length > 0;
  sync($("errors"), errs, (e) => `${e.time}|${e.status}|${e.message}`,
    () => cells(el("tr", "error"), 5, [2]), (tr, e) => {
      const c = tr.cells;
      set(c[0], clock(e.time));
      set(c[1], e.model);
      set(c[2], e.status, "num s" + String(e.status)[0]);
      set(c[3], e.type);
      set(c[4], e.message, "msg");
    });

  const ds = s.planner;
  $("no-decisions").hidden = ds.length > 0;
  sync($("decisions"), ds, (d) => `${d.time}|${d.model}|${d.role}`,
    () => cells(el("tr", "decision"), 4, []), (tr, d) => {
      const c = tr.cells;
      set(c[0], clock(d.time));
      set(c[1], `${d.model}/${d.role}`);
      const up = d.target > d.current;
      set(c[2], `${d.current} \\u2192 ${d.target}` + (d.dry_run ? " (dry run)" : ""),
          up ? "up" : "down");
      set(c[3], d.reason, "msg");
    });
}

let polls = 0;
async function poll() {
  try {
    const resp = await fetch("status.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    polls += 1;
    document.body.dataset.polls = String(polls);
    set($("conn"), `live \\u00b7 ${new Date().toLocaleTimeString()}`, "conn live");
  } catch (err) {
    set($("conn"), `no answer (${err.message}); retrying`, "conn stale");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>dynamo-gateway status</title>\n"
    '<link rel="icon" href="data:,">\n'
    f"<style>{_CSS}</style>\n</head>\n<body>{_BODY}<script>{_JS}</script>\n</body>\n</html>\n"
).encode()

CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(_JS)}; style-src {_csp_hash(_CSS)}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


async def status_page(request: Request) -> Response:
    return Response(
        PAGE,
        media_type="text/html; charset=utf-8",
        headers={"content-security-policy": CONTENT_SECURITY_POLICY, "cache-control": "no-cache"},
    )


def status_routes(gateway: Gateway) -> list[Route]:
    """``GET /status`` (the page) and ``GET /status.json`` (its data)."""

    async def status_json(request: Request) -> Response:
        body = msgspec.json.encode(status_report(gateway))
        return JSONBytes(body, headers={"cache-control": "no-store"})

    return [
        Route("/status", status_page, methods=["GET"]),
        Route("/status.json", status_json, methods=["GET"]),
    ]
