"""The pure translations, on values shaped as TensorRT-LLM produces them (trtllm_recorded)."""

from __future__ import annotations

import base64

import pytest
from dynamo_gateway_trtllm.translate import (
    DeltaState,
    GenerationPlan,
    completion_delta,
    decode_handoff,
    encode_handoff,
    finish_reason,
    load_from_stats,
    plan_generation,
    sampling_kwargs,
    token_logprobs,
)
from trtllm_recorded import (
    ITERATION_STATS,
    CompletionOutput,
    DisaggregatedParams,
    Logprob,
)

from dynamo_gateway.disagg.params import decode_leg, prefill_leg
from dynamo_gateway.errors import EngineError, InvalidRequestError
from dynamo_gateway.protocol.engine import (
    EngineRequest,
    FinishReason,
    LoadMetrics,
    SamplingParams,
    TokenLogprob,
)


def _kw(eos: tuple[int, ...] = (2,), max_logprobs: int = 20, **fields: object) -> dict[str, object]:
    params = SamplingParams(max_tokens=8, **fields)  # type: ignore[arg-type]
    return sampling_kwargs(params, max_tokens=8, eos_token_ids=eos, max_logprobs=max_logprobs)


def test_defaults_sample_over_everything() -> None:
    assert _kw() == {
        "max_tokens": 8,
        "detokenize": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "end_id": 2,
    }


def test_greedy_is_top1() -> None:
    kw = _kw(temperature=0.0, top_p=0.5, top_k=5)
    assert kw["top_k"] == 1
    assert "temperature" not in kw and "top_p" not in kw


def test_every_field_maps_one_to_one() -> None:
    kw = _kw(
        eos=(2, 7),
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=3,
        min_tokens=2,
        stop_token_ids=(11,),
        logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
    )
    assert kw == {
        "max_tokens": 8,
        "detokenize": False,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 3,
        "min_tokens": 2,
        "end_id": 2,
        "stop_token_ids": [11, 7],
        "include_stop_str_in_output": True,
        "logprobs": 3,
        "repetition_penalty": 1.2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
    }


def test_ignore_eos_keeps_other_eos_ids_out_of_the_stop_ids() -> None:
    kw = _kw(eos=(2, 7), ignore_eos=True)
    assert kw["ignore_eos"] is True and kw["end_id"] == 2
    assert "stop_token_ids" not in kw


def test_logprobs_zero_asks_for_one() -> None:
    assert _kw(logprobs=0)["logprobs"] == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_what_trtllm_cannot_honour_is_a_400(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        _kw(**fields)
    assert exc.value.param == param and exc.value.status == 400


def test_no_budget_left_is_a_400() -> None:
    with pytest.raises(InvalidRequestError):
        sampling_kwargs(
            SamplingParams(max_tokens=2), max_tokens=0, eos_token_ids=(), max_logprobs=0
        )


@pytest.mark.parametrize(
    ("raw", "ours"),
    [
        (None, None),
        ("stop", FinishReason.STOP),
        ("length", FinishReason.LENGTH),
        ("cancelled", FinishReason.ABORT),
        ("timeout", FinishReason.ERROR),
        ("not_finished", FinishReason.LENGTH),
        ("something new", FinishReason.ERROR),
    ],
)
def test_finish_reasons(raw: str | None, ours: FinishReason | None) -> None:
    assert finish_reason(raw) is ours


AGG = GenerationPlan([1, 2, 3], 8, None)


def test_cumulative_outputs_become_deltas() -> None:
    state = DeltaState()
    c = CompletionOutput(token_ids=[5])
    out, state = completion_delta(c, state, plan=AGG, logprobs=None, cached_tokens=16)
    assert out.token_ids == [5] and out.cached_tokens == 16 and out.finish_reason is None
    c.token_ids.extend([6, 7])
    out, state = completion_delta(c, state, plan=AGG, logprobs=None, cached_tokens=16)
    assert out.token_ids == [6, 7] and out.cached_tokens is None
    c.finish_reason = "length"
    out, state = completion_delta(c, state, plan=AGG, logprobs=None)
    assert out.token_ids == [] and out.finish_reason is FinishReason.LENGTH
    assert state.emitted == 3


def test_cached_tokens_wait_for_the_first_output_with_content() -> None:
    out, state = completion_delta(
        CompletionOutput(), DeltaState(), plan=AGG, logprobs=None, cached_tokens=4
    )
    assert out.token_ids == [] and not state.started
    out, state = completion_delta(
        CompletionOutput(token_ids=[9]), state, plan=AGG, logprobs=None, cached_tokens=4
    )
    assert out.cached_tokens == 4


def test_generation_only_skips_the_context_legs_first_token() -> None:
    plan = GenerationPlan([1, 2], 4, {"request_type": "generation_only"}, (9,))
    out, _ = completion_delta(
        CompletionOutput(token_ids=[9, 10]), DeltaState(), plan=plan, logprobs=None
    )
    assert out.token_ids == [10]
    # ... and does not skip when TensorRT-LLM left it out.
    out, _ = completion_delta(
        CompletionOutput(token_ids=[10, 11]), DeltaState(), plan=plan, logprobs=None
    )
    assert out.token_ids == [10, 11]


def test_error_finish_says_why() -> None:
    out, _ = completion_delta(
        CompletionOutput(token_ids=[1], finish_reason="timeout"),
        DeltaState(),
        plan=AGG,
        logprobs=None,
    )
    assert out.finish_reason is FinishReason.ERROR and "timeout" in (out.error or "")


def test_logprobs_dict_form() -> None:
    # The sampled token 5 ranks second; top-2 alternatives by rank.
    entry = {7: Logprob(-0.1, 1), 5: Logprob(-2.5, 2), 8: Logprob(-3.0, 3)}
    assert token_logprobs([5], [entry], top=2) == [TokenLogprob(5, -2.5, [(7, -0.1), (5, -2.5)])]
    assert token_logprobs([5], [entry], top=0) == [TokenLogprob(5, -2.5, [])]


def test_logprobs_float_form_and_deltas() -> None:
    c = CompletionOutput(token_ids=[4, 5], logprobs=[-0.5, -1.5])
    out, state = completion_delta(c, DeltaState(), plan=AGG, logprobs=0)
    assert out.logprobs == [TokenLogprob(4, -0.5, []), TokenLogprob(5, -1.5, [])]
    c.token_ids.append(6)
    c.logprobs.append(-0.25)
    out, _ = completion_delta(c, state, plan=AGG, logprobs=0)
    assert out.logprobs == [TokenLogprob(6, -0.25, [])]


def test_logprobs_missing_are_an_engine_error() -> None:
    with pytest.raises(EngineError):
        token_logprobs([1, 2], [-0.1], top=0)
    with pytest.raises(EngineError):
        token_logprobs([1], [{2: Logprob(-0.1, 1)}], top=1)


def test_stats_to_load() -> None:
    assert load_from_stats(ITERATION_STATS) == LoadMetrics(
        active_requests=3, waiting_requests=3, kv_blocks_used=600, kv_blocks_total=1000
    )
    # Without usedNumBlocks (older executors): max - free.
    partial = {"numActiveRequests": 1, "kvCacheStats": {"maxNumBlocks": 10, "freeNumBlocks": 4}}
    assert load_from_stats(partial).kv_blocks_used == 6


def _request(**kw: object) -> EngineRequest:
    return EngineRequest(
        request_id="r",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=5),
        **kw,  # type: ignore[arg-type]
    )


def test_plan_aggregated_and_resumed() -> None:
    plan = plan_generation(_request(resumed_token_ids=[4]))
    assert plan == GenerationPlan([1, 2, 3, 4], 4, None)


def test_handoff_round_trip_through_our_legs() -> None:
    request = _request()
    leg = plan_generation(prefill_leg(request))
    assert leg.disaggregated == {"request_type": "context_only"} and leg.max_tokens == 1
    ctx = DisaggregatedParams(
        request_type="context_only",
        first_gen_tokens=[9],
        ctx_request_id=1234,
        opaque_state=b"\x00\xffstate",
        draft_tokens=None,
    )
    params = encode_handoff(ctx, worker_id="p0", num_tokens=3)
    assert params == {
        "do_remote_prefill": True,
        "remote_engine_id": "p0",
        "num_tokens": 3,
        "trtllm": {
            "first_gen_tokens": [9],
            "ctx_request_id": 1234,
            "opaque_state": base64.b64encode(b"\x00\xffstate").decode(),
        },
    }
    plan = plan_generation(decode_leg(request, [9], params))
    # The context leg's prompt, and a budget that counts the first token again.
    assert plan.prompt_token_ids == [1, 2, 3] and plan.max_tokens == 5
    assert plan.first_gen_tokens == (9,)
    assert plan.disaggregated == {
        "request_type": "generation_only",
        "first_gen_tokens": [9],
        "ctx_request_id": 1234,
        "opaque_state": b"\x00\xffstate",
    }


def test_foreign_or_missing_handoff_serves_aggregated() -> None:
    assert encode_handoff(None, worker_id="p", num_tokens=1) is None
    assert (
        encode_handoff(DisaggregatedParams(first_gen_tokens=[1]), worker_id="p", num_tokens=1)
        is None
    )
    foreign = {"do_remote_prefill": True, "transfer_id": "t", "remote_block_ids": [1]}
    assert decode_handoff(foreign) is None
    plan = plan_generation(decode_leg(_request(), [9], foreign))
    assert plan.disaggregated is None and plan.prompt_token_ids == [1, 2, 3, 9]


def test_malformed_handoff_is_a_400() -> None:
    with pytest.raises(InvalidRequestError):
        decode_handoff(
            {"do_remote_prefill": True, "trtllm": {"first_gen_tokens": [1], "opaque_state": "!!"}}
        )
    with pytest.raises(InvalidRequestError):
        decode_handoff({"do_remote_prefill": True, "trtllm": {"ctx_request_id": 1}})
    with pytest.raises(InvalidRequestError):
        decode_handoff({"do_remote_prefill": True, "trtllm": "x"})


def test_constraints_map_to_guided_decoding_and_logit_bias_is_a_400() -> None:
    from dynamo_gateway_trtllm.translate import guided_decoding_kwargs

    from dynamo_gateway.protocol.engine import Constraint

    assert guided_decoding_kwargs(None) is None
    assert guided_decoding_kwargs(Constraint(kind="json_schema", spec="{}")) == {"json": "{}"}
    assert guided_decoding_kwargs(Constraint(kind="json_object")) == {"json_object": True}
    assert guided_decoding_kwargs(Constraint(kind="regex", spec="a+")) == {"regex": "a+"}
    assert guided_decoding_kwargs(Constraint(kind="choice", spec='["a"]')) == {
        "grammar": 'root ::= "a"'
    }
    with pytest.raises(InvalidRequestError, match="after reasoning"):
        guided_decoding_kwargs(Constraint(kind="regex", spec="a", after_token_ids=(1,)))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        sampling_kwargs(
            SamplingParams(max_tokens=4, logit_bias=((1, 2.0),)), max_tokens=4,
            eos_token_ids=(2,), max_logprobs=5,
        )  # fmt: skip
