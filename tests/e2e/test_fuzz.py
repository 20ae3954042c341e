"""Schema-driven fuzzing of a real gateway with schemathesis, from its own /openapi.json.

Every documented operation gets valid bodies (positive) and bodies that break the
schema (negative). Checks: never a 5xx; every 4xx is an OpenAI error; status
codes, content types, headers and bodies (SSE events included) are what the
document declares; and a body that breaks the schema is rejected, which holds
the request types to their schema from the other side.

Schemathesis draws `model` as any string, which would stop nearly every request
at 404, and chat `role` likewise; the test points most bodies at the served model
and a real role, so that templating, tokenizing and generation see fuzzed values.

Bounded and reproducible: derandomized Hypothesis (the same examples every run),
at most `DG_FUZZ_EXAMPLES` examples per operation and mode, a deadline per example.
Schemathesis' pytest integration (`from_fixture`) fails on pytest 9, so the cases
come from its Python API (`APIOperation.as_strategy`) under plain `@given`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from dynamo_gateway.frontend.openapi import build_openapi
from dynamo_gateway.protocol.openai import ROLES
from dynamo_gateway.testing import GatewayProcess, start_gateway

EXAMPLES = int(os.environ.get("DG_FUZZ_EXAMPLES", "200"))
SERVED = "demo"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Known at collection (the server starts later): the document is built from code.
OPERATIONS = [
    (method.upper(), path)
    for path, item in build_openapi()["paths"].items()
    for method in item
    if path != "/openapi.json"  # schemathesis leaves the document itself out
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[GatewayProcess]:
    # A short context keeps the default max_tokens (the rest of the window) cheap.
    args = ["--model", str(demo_model), "--engine", "mocker", "--speedup", "100"]
    gw = start_gateway([*args, "--max-model-len", "256"], tmp_path_factory.mktemp("fuzz"))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def api(gateway: GatewayProcess) -> OpenApiSchema:
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=10)
    schema.config.update(base_url=gateway.url)
    return schema


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def test_the_served_document_is_fuzzed(api: OpenApiSchema) -> None:
    tested = {(op.method.upper(), op.path) for op in (r.ok() for r in api.get_all_operations())}
    assert tested == set(OPERATIONS)


def _steer(body: Any, *, model: bool, role: Callable[[], str] | None) -> None:
    """Point a generated body at the served model (`model`) and give its messages
    real roles (`role`, when given)."""
    if not isinstance(body, dict):
        return
    if model and isinstance(body.get("model"), str):
        body["model"] = SERVED
    messages = body.get("messages")
    if role is not None and isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and isinstance(message.get("role"), str):
                message["role"] = role()


def _check_openai_error(response: schemathesis.Response) -> None:
    if response.status_code < 400:
        return
    text = response.content.decode(errors="replace")
    assert response.headers["content-type"] == ["application/json"], text
    error = msgspec.json.decode(response.content)["error"]
    assert isinstance(error["message"], str) and error["message"], text
    assert isinstance(error["type"], str) and error["type"], text


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [
        (method, path, mode)
        for method, path in OPERATIONS
        for mode in GenerationMode
        # GETs take no parameters and no body: nothing to break.
        if method == "POST" or mode is GenerationMode.POSITIVE
    ],
)
def test_fuzz(
    api: OpenApiSchema,
    session: requests.Session,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = api[path][method]
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    strategy = operation.as_strategy(generation_mode=mode)
    roles = st.sampled_from(sorted(ROLES))

    @settings(
        max_examples=EXAMPLES if method == "POST" else 5,
        derandomize=True,
        database=None,
        deadline=timedelta(seconds=20),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(strategy)
        if mode is GenerationMode.POSITIVE:
            # Mostly, not always: Hypothesis favours the low end, so 9 is the rare "leave it".
            _steer(
                case.body,
                model=data.draw(st.integers(0, 9)) != 9,
                role=(lambda: data.draw(roles)) if data.draw(st.integers(0, 9)) != 9 else None,
            )
        response = case.call(session=session, timeout=30)
        _check_openai_error(response)
        case.validate_response(response, checks=checks)

    run()


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_coverage_cases(
    api: OpenApiSchema, session: requests.Session, method: str, path: str
) -> None:
    """Schemathesis' coverage phase: each field at and past its bounds, missing, of the
    wrong type, and the operation called with methods it does not allow. Deterministic."""
    operation = api[path][method]
    config = api.config.generation_for(operation=operation)
    cases = api.iter_coverage_cases(
        operation, generation_modes=list(GenerationMode), generation_config=config
    )
    roles = itertools.cycle(sorted(ROLES))
    count = 0
    for case in cases:
        positive = case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
        if positive:
            _steer(case.body, model=True, role=lambda: next(roles))
        response = case.call(session=session, timeout=30)
        _check_openai_error(response)
        checks = CHECKS if positive else [*CHECKS, negative_data_rejection, unsupported_method]
        case.validate_response(response, checks=checks)
        count += 1
    assert count > (100 if method == "POST" else 5)
