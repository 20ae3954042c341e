"""The OpenAPI document: valid OpenAPI 3.1, complete, and generated from the request types."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest

# The official OpenAPI 3.1 meta-schema (spec.openapis.org/oas/3.1/schema/2022-10-07), as
# schemathesis ships it: openapi-spec-validator is not a dependency.
from schemathesis.specs.openapi.definitions import OPENAPI_31
from starlette.applications import Starlette
from starlette.routing import Route

from dynamo_gateway.frontend.app import GatewayApp, build_app
from dynamo_gateway.frontend.openapi import REQUEST_TYPES, build_openapi
from dynamo_gateway.protocol.openai import ChatCompletionRequest, CompletionRequest
from dynamo_gateway.protocol.responses import ResponsesRequest
from dynamo_gateway.server import embedded
from dynamo_gateway.settings import load_settings

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _validate(document: dict[str, Any]) -> None:
    """Raise if `document` is not OpenAPI 3.1 or a schema in it is not JSON Schema 2020-12."""
    jsonschema.Draft202012Validator(OPENAPI_31).validate(document)
    # The meta-schema leaves Schema Objects to the dialect: check each one, and its $refs.
    names = set(document["components"]["schemas"])
    for schema in _schemas(document):
        jsonschema.Draft202012Validator.check_schema(schema)
        for ref in _refs(schema):
            prefix, _, name = ref.rpartition("/")
            assert prefix == "#/components/schemas" and name in names, ref


def _schemas(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from document["components"]["schemas"].values()
    for item in document["paths"].values():
        for op in item.values():
            body = op.get("requestBody", {}).get("content", {})
            responses = [r.get("content", {}) for r in op["responses"].values()]
            for content in [body, *responses]:
                for media in content.values():
                    yield media["schema"]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_document_is_valid_openapi_31() -> None:
    document = build_openapi()
    assert document["openapi"].startswith("3.1.")
    _validate(document)


@pytest.mark.parametrize(
    "breakage",
    ["undescribed response", "dangling ref", "bad schema", "no info"],
)
def test_validation_catches_a_broken_document(breakage: str) -> None:
    # The validation above is not vacuous: each of these breaks it.
    document = copy.deepcopy(build_openapi())
    op = document["paths"]["/v1/chat/completions"]["post"]
    if breakage == "undescribed response":
        del op["responses"]["200"]["description"]
    elif breakage == "dangling ref":
        op["requestBody"]["content"]["application/json"]["schema"] = {
            "$ref": "#/components/schemas/Nope"
        }
    elif breakage == "bad schema":
        document["components"]["schemas"]["Usage"]["required"] = "prompt_tokens"
    else:
        del document["info"]
    with pytest.raises((jsonschema.ValidationError, jsonschema.SchemaError, AssertionError)):
        _validate(document)


def test_request_schemas_are_what_msgspec_generates() -> None:
    # The drift check: recomputed here, independently of the module under test.
    types = [ChatCompletionRequest, CompletionRequest, ResponsesRequest]
    refs, expected = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    document = build_openapi()
    schemas = document["components"]["schemas"]
    assert {name: schemas[name] for name in expected} == expected
    for path, kind in zip(REQUEST_TYPES, types, strict=True):
        assert REQUEST_TYPES[path] is kind
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == refs[types.index(kind)]
    # The request structs refuse unknown fields, and the document says so at every level.
    for name, schema in expected.items():
        assert schema.get("additionalProperties") is False, name


def test_error_responses_are_documented_with_the_openai_shape() -> None:
    document = build_openapi()
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    for path in REQUEST_TYPES:
        responses = document["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "503"} <= set(responses)
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        for code in ("400", "401", "404", "413", "429", "503"):
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "Retry-After" in responses["429"]["headers"]


@pytest.fixture
async def app(demo_model: Path) -> AsyncIterator[GatewayApp]:
    settings = load_settings(
        engine="mocker", models=[{"path": demo_model, "name": "demo"}], mocker={"speedup": 1e6}
    )
    async with embedded(settings) as gateway:
        yield build_app(gateway)


def _client(app: GatewayApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


async def test_every_route_is_documented(app: GatewayApp) -> None:
    assert isinstance(app.fallback, Starlette)
    served = set()
    for route in app.fallback.routes:
        assert isinstance(route, Route) and route.methods is not None
        # Starlette answers HEAD on every GET route by itself.
        served |= {(route.path, m.lower()) for m in route.methods if m != "HEAD"}
    paths = build_openapi()["paths"]
    documented = {(path, m) for path, item in paths.items() for m in item if m in METHODS}
    assert documented == served


async def test_served_document_is_the_built_one(app: GatewayApp) -> None:
    async with _client(app) as client:
        first = await client.get("/openapi.json")
        second = await client.get("/openapi.json")
    assert first.status_code == 200
    assert first.headers["content-type"] == "application/json"
    assert first.json() == build_openapi()
    assert first.content == second.content


async def test_real_errors_match_the_documented_error_schema(app: GatewayApp) -> None:
    document = build_openapi()
    # The document rides along so that the schema's "#/components/..." refs resolve.
    schema = {**document["components"]["schemas"]["ErrorResponse"], **document}
    validator = jsonschema.Draft202012Validator(schema)
    async with _client(app) as client:
        bad = [
            await client.post("/v1/chat/completions", content=b"{"),
            await client.post("/v1/completions", json={"model": "demo", "prompt": "x", "n": 0}),
            await client.post("/v1/responses", json={"model": "nope", "input": "x"}),
            await client.post(
                "/v1/chat/completions", json={"model": "demo", "messages": [], "x": 1}
            ),
        ]
    assert [r.status_code for r in bad] == [400, 400, 404, 400]
    for response in bad:
        validator.validate(response.json())
