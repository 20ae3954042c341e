"""The conformance suite on the mocker (no EOS, no stop ids: it draws words)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_gateway.testing.conformance import (
    Capabilities,
    EngineConformance,
    EngineSpec,
    GatewayConformance,
)


@pytest.fixture(scope="class")
def engine_spec(demo_model: Path) -> EngineSpec:
    return EngineSpec(
        engine="mocker",
        model=demo_model,
        # Fast, but slow enough that a 512-token request is still running when
        # the tests abort it.
        settings={"mocker": {"speedup": 20}, "cache": {"num_kv_blocks": 512}},
        capabilities=Capabilities(
            deterministic_greedy=True,
            prefix_caching=True,
            logprobs=True,
            kv_events=True,
            kv_snapshot=True,
            disagg=True,
            structured_output=True,
            logit_bias=True,
        ),
        plugins=[],
    )


class TestMockerEngine(EngineConformance):
    pass


class TestMockerGateway(GatewayConformance):
    pass
