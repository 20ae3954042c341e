"""The toy engine passes the conformance suite, engine-level and behind the gateway."""

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
        engine="toy",  # the name the plugin registers, found through its entry point
        model=demo_model,
        settings={"cache": {"num_kv_blocks": 256}, "plugin_config": {"toy": {"step_s": 0.0005}}},
        capabilities=Capabilities(
            deterministic_greedy=True,
            prefix_caching=True,
            logprobs=True,
            stop_token_ids=True,
            eos=True,
            kv_events=True,
            kv_snapshot=True,
        ),
        plugins=["toy"],
    )


class TestToyEngine(EngineConformance):
    pass


class TestToyEngineBehindTheGateway(GatewayConformance):
    pass
