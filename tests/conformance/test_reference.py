"""The conformance suite on the torch reference engine (the demo model, on the CPU)."""

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
        engine="reference",
        model=demo_model,
        # The CPU: prefill and decode workers move KV from host memory only.
        settings={"reference": {"device": "cpu"}, "cache": {"num_kv_blocks": 256}},
        capabilities=Capabilities(
            deterministic_greedy=True,
            prefix_caching=True,
            logprobs=True,
            stop_token_ids=True,
            eos=True,
            kv_events=True,
            kv_snapshot=True,
            disagg=True,
            structured_output=True,
            logit_bias=True,
        ),
        plugins=[],
        # The demo model's random weights reach EOS (id 1) after 10 tokens of this one.
        eos_prompt=[68, 1905, 1908, 2025, 1924, 465, 452, 873, 1352, 310, 1518, 1000, 1199, 794],
        max_tokens_long=256,
    )


class TestReferenceEngine(EngineConformance):
    pass


class TestReferenceGateway(GatewayConformance):
    pass
