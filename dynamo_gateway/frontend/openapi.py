"""The OpenAPI 3.1 document of the gateway's HTTP API (served at ``GET /openapi.json``).

Request bodies are msgspec's JSON Schema of the very structs the endpoints decode
with, so the document cannot drift from what the gateway accepts: a field added
to `ChatCompletionRequest` shows up here, and the request structs forbid unknown
fields, which msgspec writes as ``additionalProperties: false``. Response bodies
are hand-written and loose (the required keys and their types, nothing more):
they are built from plain dicts, and a client may rely on what they name.

Streams: OpenAPI 3.1 has no word for one event of a ``text/event-stream`` (3.2
adds ``itemSchema``), so its ``schema`` describes each event, ``{"event", "data"}``,
with the JSON in ``data`` given by ``contentMediaType`` + ``contentSchema``; that
is how 3.1 tooling (schemathesis among it) reads an event stream.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from dynamo_gateway import __version__
from dynamo_gateway.protocol.openai import ChatCompletionRequest, CompletionRequest
from dynamo_gateway.protocol.responses import ResponsesRequest

__all__ = ["REQUEST_TYPES", "build_openapi", "openapi_json", "request_components"]

REF = "#/components/schemas/{name}"

# The generation endpoints and the struct each decodes its body into.
REQUEST_TYPES: dict[str, type[msgspec.Struct]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/responses": ResponsesRequest,
}

# Every error a client can cause on a generation endpoint (see dynamo_gateway.errors).
_GENERATION_ERRORS = {
    "400": "Malformed JSON, a wrong type, an out-of-range value or an unknown field",
    "401": "Missing or wrong API key (only when the gateway is started with API keys)",
    "404": "No worker pool serves that model",
    "408": "The body did not arrive in full within the body timeout (a stalled upload)",
    "413": "The body is larger than --max-body-bytes",
    "429": "The gateway is at its limit of requests in flight (see Retry-After)",
    "503": "No live worker serves the model (see Retry-After)",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}


def request_components() -> dict[str, Any]:
    """msgspec's schemas of the request structs and every struct they contain."""
    _, components = msgspec.json.schema_components(list(REQUEST_TYPES.values()), ref_template=REF)
    return components


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    # Loose on purpose: responses may grow keys without breaking this document.
    return {"type": "object", "required": list(required), "properties": {**required, **optional}}


_STR = {"type": "string"}
_INT = {"type": "integer"}


def _response_components() -> dict[str, Any]:
    usage = _object(
        {"prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT},
        prompt_tokens_details=_nullable({"type": "object"}),
    )
    finish = _nullable(_STR)
    chat_choice = _object(
        {
            "index": _INT,
            "message": _object(
                {"role": {"const": "assistant"}, "content": _nullable(_STR)},
                reasoning_content=_nullable(_STR),
                tool_calls={"type": "array", "items": {"type": "object"}},
            ),
            "finish_reason": finish,
        },
        logprobs=_nullable({"type": "object"}),
    )
    text_choice = _object(
        {"index": _INT, "text": _STR, "finish_reason": finish},
        logprobs=_nullable({"type": "object"}),
    )

    def completion(obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return _object(
            {
                "id": _STR,
                "object": {"const": obj},
                "created": _INT,
                "model": _STR,
                "choices": {"type": "array", "items": choice},
            },
            usage=_ref("Usage"),
        )

    def chunk(obj: str) -> dict[str, Any]:
        return _object(
            {
                "id": _STR,
                "object": {"const": obj},
                "created": _INT,
                "model": _STR,
                "choices": {"type": "array", "items": _object({"index": _INT})},
            },
            usage=_nullable(_ref("Usage")),
        )

    status = _object({"status": _STR}, models={"type": "object"})
    return {
        "Error": _object(
            {"message": _STR, "type": _STR, "param": _nullable(_STR), "code": _nullable(_STR)}
        ),
        "ErrorResponse": _object({"error": _ref("Error")}),
        "Usage": usage,
        "ChatCompletion": completion("chat.completion", chat_choice),
        "TextCompletion": completion("text_completion", text_choice),
        "ChatCompletionChunk": chunk("chat.completion.chunk"),
        "TextCompletionChunk": chunk("text_completion"),
        "ResponseEvent": _object({"type": _STR}),
        "Response": _object(
            {
                "id": _STR,
                "object": {"const": "response"},
                "created_at": _INT,
                "status": {"enum": ["completed", "incomplete"]},
                "model": _STR,
                "output": {"type": "array", "items": {"type": "object"}},
            },
            usage=_nullable({"type": "object"}),
        ),
        "Model": _object(
            {"id": _STR, "object": {"const": "model"}, "created": _INT, "owned_by": _STR},
            max_model_len=_INT,
        ),
        "ModelList": _object(
            {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}
        ),
        "Status": status,
    }


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(codes: dict[str, str]) -> dict[str, Any]:
    out = {}
    for code, description in codes.items():
        out[code] = _json(_ref("ErrorResponse"), description)
        if code in ("429", "503"):
            out[code]["headers"] = _RETRY_AFTER
    return out


def _event(data: dict[str, Any], *, done: bool) -> dict[str, Any]:
    """One server-sent event whose data is JSON matching `data` (or an error object,
    which ends a stream that fails after its first event)."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [data, _ref("ErrorResponse")]},
    }
    return _object(
        {"data": {"anyOf": [{"const": "[DONE]"}, json_data]} if done else json_data},
        event=_STR,
    )


def _generation(
    path: str, summary: str, result: str, event: str, events: str, *, done: bool = True
) -> dict[str, Any]:
    name = REQUEST_TYPES[path].__name__
    ok = _json(_ref(result), f"The whole {result} (`stream` false)")
    ok["description"] += f", or {events} (`stream` true)"
    ok["content"]["text/event-stream"] = {"schema": _event(_ref(event), done=done)}
    return {
        "post": {
            "operationId": name[0].lower() + name[1:].removesuffix("Request"),
            "summary": summary,
            "security": [{}, {"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(name)}},
            },
            "responses": {"200": ok, **_errors(_GENERATION_ERRORS)},
        }
    }


def _get(op_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": op_id, "summary": summary, "responses": responses}}


def build_openapi() -> dict[str, Any]:
    """The document, as plain JSON-able data (see `openapi_json` for the served bytes)."""
    components = request_components()
    responses = _response_components()
    clash = components.keys() & responses.keys()
    if clash:  # a request struct named like a response schema would silently replace it
        raise RuntimeError(f"OpenAPI component names used twice: {sorted(clash)}")
    status = _ref("Status")
    paths = {
        "/v1/chat/completions": _generation(
            "/v1/chat/completions", "Chat completion", "ChatCompletion", "ChatCompletionChunk",
            "`chat.completion.chunk` events ending with `data: [DONE]`",
        ),
        "/v1/completions": _generation(
            "/v1/completions", "Text completion", "TextCompletion", "TextCompletionChunk",
            "`text_completion` events ending with `data: [DONE]`",
        ),
        "/v1/responses": _generation(
            "/v1/responses", "Responses API (stateless)", "Response", "ResponseEvent",
            "typed `response.*` events", done=False,
        ),
        "/v1/models": _get("listModels", "The served models", {
            "200": _json(_ref("ModelList"), "The served models"),
            **_errors({"401": _GENERATION_ERRORS["401"]}),
        }),
        "/health": _get("health", "Checks every worker", {
            "200": _json(status, "Every worker answered its health check"),
            "503": _json(status, "No model, or a worker failed its health check"),
        }),
        "/live": _get("live", "The process is up", {"200": _json(status, "Live")}),
        "/ready": _get("ready", "Every model has a worker that decodes", {
            "200": _json(status, "Ready"),
            "503": _json(status, "Not ready: a model has no decoding worker"),
        }),
        "/metrics": _get("metrics", "Prometheus metrics", {
            "200": {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        }),
        "/status": _get("statusPage", "The live status page", {
            "200": {
                "description": "One self-contained HTML page that polls /status.json",
                "content": {"text/html": {"schema": {"type": "string"}}},
            },
        }),
        "/status.json": _get("status", "The status page's data", {
            "200": _json({"type": "object"}, "Models, workers, requests, recent errors"),
        }),
        "/openapi.json": _get("openapi", "This document", {
            "200": _json({"type": "object"}, "The OpenAPI 3.1 document"),
        }),
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dynamo-gateway",
            "version": __version__,
            "description": "OpenAI-compatible LLM inference gateway",
        },
        "paths": paths,
        "components": {
            "schemas": {**components, **responses},
            # Optional: only a gateway started with API keys checks them.
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@functools.cache
def openapi_json() -> bytes:
    """The served document, encoded once per process."""
    return msgspec.json.encode(build_openapi())
