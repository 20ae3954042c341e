"""The SGLang translations, on values shaped as SGLang 0.5.23 builds them (`sglang_recorded.py`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import sglang_recorded as recorded
from dynamo_gateway_sglang import translate

from dynamo_gateway.disagg.params import decode_leg, prefill_leg
from dynamo_gateway.errors import InvalidRequestError
from dynamo_gateway.protocol.engine import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    SamplingParams,
    TokenLogprob,
    WorkerRole,
)


def _deltas(
    outs: Sequence[dict[str, Any]], *, incremental: bool, k: int | None = 2
) -> list[EngineOutput]:
    seen, first, got = 0, True, []
    for out in outs:
        delta, seen = translate.stream_delta(
            out, seen=seen, incremental=incremental, first=first, k=k
        )
        if delta is not None:
            first = False
            got.append(delta)
    return got


@pytest.mark.parametrize(
    ("outs", "incremental"),
    [(recorded.CUMULATIVE, False), (recorded.INCREMENTAL, True)],
    ids=["cumulative", "incremental"],
)
def test_stream_deltas_in_both_modes(outs: list[dict[str, Any]], incremental: bool) -> None:
    deltas = _deltas(outs, incremental=incremental)
    assert [t for d in deltas for t in d.token_ids] == recorded.IDS
    assert deltas[0].cached_tokens == 4
    assert all(d.cached_tokens is None for d in deltas[1:])
    assert [d.finish_reason for d in deltas][-1] is FinishReason.STOP
    assert all(d.finish_reason is None for d in deltas[:-1])
    logprobs = [lp for d in deltas for lp in d.logprobs or []]
    assert logprobs == [
        TokenLogprob(791, -0.25, [(791, -0.25), (40, -2.0)]),
        TokenLogprob(13, -1.5, [(11, -0.75), (13, -1.5)]),
        TokenLogprob(2, -0.125, [(2, -0.125), (0, -3.0)]),
    ]


def test_cumulative_ids_are_read_at_once() -> None:
    # SGLang hands out a reference to its growing list: what is new must be copied now.
    ids = [1, 2]
    out = {"output_ids": ids, "meta_info": {"finish_reason": None, "completion_tokens": 2}}
    delta, seen = translate.stream_delta(out, seen=1, incremental=False, first=False, k=None)
    ids.append(3)
    assert delta is not None and delta.token_ids == [2] and seen == 2


def test_no_logprobs_unless_asked() -> None:
    deltas = _deltas(recorded.CUMULATIVE, incremental=False, k=None)
    assert all(d.logprobs is None for d in deltas)
    top0 = _deltas(recorded.CUMULATIVE, incremental=False, k=0)
    assert [lp.top for d in top0 for lp in d.logprobs or []] == [[], [], []]


@pytest.mark.parametrize(
    ("echo", "incremental"),
    [(recorded.ABORT_ECHO_INCREMENTAL, True), (recorded.ABORT_ECHO_CUMULATIVE, False)],
    ids=["incremental", "cumulative"],
)
def test_abort_echo_adds_no_token(echo: dict[str, Any], incremental: bool) -> None:
    delta, seen = translate.stream_delta(echo, seen=2, incremental=incremental, first=False, k=2)
    assert delta is not None
    assert delta.token_ids == [] and delta.finish_reason is FinishReason.ABORT
    assert delta.error is None and seen == 2


def test_refused_request_is_an_error() -> None:
    delta, _ = translate.stream_delta(
        recorded.REFUSED, seen=0, incremental=False, first=True, k=None
    )
    assert delta is not None and delta.finish_reason is FinishReason.ERROR
    assert delta.error is not None and "bootstrap room" in delta.error
    assert delta.cached_tokens == 0


def test_empty_running_output_is_skipped() -> None:
    out = {"output_ids": [1], "meta_info": {"finish_reason": None, "completion_tokens": 1}}
    assert translate.stream_delta(out, seen=1, incremental=False, first=False, k=None) == (None, 1)


@pytest.mark.parametrize(
    ("reason", "ours"),
    [
        (None, None),
        (recorded.EOS, FinishReason.STOP),
        ({"type": "stop", "matched": "</s>"}, FinishReason.STOP),
        (recorded.LENGTH, FinishReason.LENGTH),
        ({"type": "abort", "message": "Aborted"}, FinishReason.ABORT),
        (
            {"type": "abort", "message": "x", "status_code": None, "err_type": None},
            FinishReason.ABORT,
        ),
        ({"type": "abort", "message": "boom", "status_code": 500}, FinishReason.ERROR),
        ({"type": "mystery"}, FinishReason.ERROR),
    ],
)
def test_finish_reasons(reason: dict[str, Any] | None, ours: FinishReason | None) -> None:
    assert translate.finish_reason(reason)[0] is ours


def test_sampling_params_one_to_one() -> None:
    params = SamplingParams(
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=(5, 6),
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
    )
    assert translate.sampling_params(params, max_new_tokens=9, deterministic=False) == {
        "max_new_tokens": 9,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "min_new_tokens": 2,
        "ignore_eos": True,
        "stop_token_ids": [5, 6],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
    }
    greedy = translate.sampling_params(
        SamplingParams(max_tokens=4, temperature=0.0, top_k=3, seed=7),
        max_new_tokens=4,
        deterministic=False,
    )
    assert greedy["top_k"] == 3 and greedy["stop_token_ids"] is None
    assert greedy["sampling_seed"] == 7  # harmless: greedy does not sample


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 2.5}, "repetition_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 5}, "min_tokens"),
        ({"seed": 1, "temperature": 0.8}, "seed"),
        ({"seed": 2**63, "temperature": 0.0}, "seed"),
    ],
)
def test_what_sglang_cannot_honour_is_a_400(fields: dict[str, Any], param: str) -> None:
    params = SamplingParams(max_tokens=4, **fields)
    with pytest.raises(InvalidRequestError) as exc:
        translate.sampling_params(params, max_new_tokens=4, deterministic=False)
    assert exc.value.status == 400 and exc.value.param == param


def test_seed_on_a_deterministic_engine() -> None:
    params = SamplingParams(max_tokens=4, temperature=0.8, seed=3)
    out = translate.sampling_params(params, max_new_tokens=4, deterministic=True)
    assert out["sampling_seed"] == 3


def test_prompt_of_counts_resumed_tokens() -> None:
    req = EngineRequest(
        request_id="r",
        prompt_token_ids=[1, 2],
        sampling=SamplingParams(max_tokens=5),
        resumed_token_ids=[7, 8],
    )
    assert translate.prompt_of(req) == ([1, 2, 7, 8], 3)
    done = EngineRequest(
        request_id="r",
        prompt_token_ids=[1],
        sampling=SamplingParams(max_tokens=1),
        resumed_token_ids=[7],
    )
    with pytest.raises(InvalidRequestError):
        translate.prompt_of(done)


def test_server_kwargs_ours_then_users() -> None:
    kwargs = translate.server_kwargs(
        "/models/smol",
        block_size=16,
        max_model_len=2048,
        role=WorkerRole.PREFILL,
        kv_events_endpoint="ipc:///tmp/x/kv-events",
        user={"mem_fraction_static": 0.8, "page_size": 32},
    )
    assert kwargs["model_path"] == "/models/smol"
    assert kwargs["page_size"] == 32  # the user's wins; the engine reads back what resolved
    assert kwargs["skip_tokenizer_init"] is True
    assert kwargs["context_length"] == 2048
    assert kwargs["disaggregation_mode"] == "prefill"
    assert kwargs["mem_fraction_static"] == 0.8
    assert json.loads(kwargs["kv_events_config"]) == {
        "publisher": "zmq",
        "endpoint": "ipc:///tmp/x/kv-events",
        "topic": "",
    }
    plain = translate.server_kwargs(
        "/m",
        block_size=16,
        max_model_len=None,
        role=WorkerRole.AGGREGATED,
        kv_events_endpoint=None,
        user={},
    )
    assert "kv_events_config" not in plain and "context_length" not in plain
    assert plain["disaggregation_mode"] == "null"


def test_resolved_server() -> None:
    server = translate.resolved_server(recorded.RESOLVED)
    assert server == translate.ResolvedServer(
        page_size=16,
        incremental_streaming=False,
        deterministic=False,
        disaggregation_mode="prefill",
        host="127.0.0.1",
        bootstrap_port=8998,
    )
    # page_size None resolves to SGLang's 1-token pages.
    assert translate.resolved_server({**recorded.RESOLVED, "page_size": None}).page_size == 1


def test_load_metrics_from_snapshots() -> None:
    other = {**recorded.LOAD_SNAPSHOT, "dp_rank": 1, "num_used_tokens": 17, "num_running_reqs": 1}
    load = translate.load_metrics([recorded.LOAD_SNAPSHOT, other], page_size=16)
    assert load.active_requests == 4
    assert load.waiting_requests == 4
    assert load.kv_blocks_used == -(-1017 // 16)
    assert load.kv_blocks_total == 2 * 160000 // 16
    assert translate.load_metrics([], page_size=16).kv_blocks_total == 0


def test_bootstrap_round_trip_through_our_legs() -> None:
    request = EngineRequest(
        request_id="r", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4)
    )
    leg = prefill_leg(request)
    assert leg.kv_transfer_params == {"do_remote_decode": True}
    params = translate.bootstrap_params("10.0.0.5", 8998, 123456789)
    # The prefill leg returns no token: the decode leg is the request itself, plus the room.
    decode = decode_leg(request, [], params)
    assert decode.resumed_token_ids == []
    assert translate.bootstrap_args(decode.kv_transfer_params) == {
        "bootstrap_host": "10.0.0.5",
        "bootstrap_port": 8998,
        "bootstrap_room": 123456789,
    }


@pytest.mark.parametrize(
    "params",
    [
        {"bootstrap_room": 1, "bootstrap_port": 8998},
        {"bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": 0},
        {"bootstrap_room": -1, "bootstrap_host": "h", "bootstrap_port": 8998},
        {"bootstrap_room": "1", "bootstrap_host": "h", "bootstrap_port": 8998},
    ],
)
def test_malformed_handoff(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        translate.bootstrap_args(params)


def test_foreign_handoff_is_not_ours() -> None:
    assert translate.bootstrap_args(None) is None
    assert translate.bootstrap_args({"do_remote_prefill": True, "remote_engine_id": "x"}) is None


def test_advertised_host() -> None:
    assert translate.advertised_host(None, "10.1.2.3", "fallback") == "10.1.2.3"
    assert translate.advertised_host(None, "0.0.0.0", "10.9.9.9") == "10.9.9.9"
    assert translate.advertised_host("pf-0.internal", "0.0.0.0", "x") == "pf-0.internal"


def test_constraints_and_logit_bias_map_to_sglang_sampling_params() -> None:
    from dynamo_gateway.protocol.engine import Constraint

    def params(**kw: Any) -> dict[str, Any]:
        return translate.sampling_params(
            SamplingParams(max_tokens=8, **kw), max_new_tokens=8, deterministic=False
        )

    assert params(constraint=Constraint(kind="json_schema", spec="{}"))["json_schema"] == "{}"
    assert params(constraint=Constraint(kind="regex", spec="a+"))["regex"] == "a+"
    choice = params(constraint=Constraint(kind="choice", spec='["yes", "no"]'))
    assert choice["ebnf"] == 'root ::= "yes" | "no"'
    assert params(constraint=Constraint(kind="grammar", spec='root ::= "x"'))["ebnf"]
    assert params(constraint=Constraint(kind="json_object"))["json_schema"]
    assert params(logit_bias=((3, -100.0),))["logit_bias"] == {"3": -100.0}
    assert not {"json_schema", "regex", "ebnf", "logit_bias"} & set(params())
    with pytest.raises(InvalidRequestError, match="after reasoning"):
        params(constraint=Constraint(kind="regex", spec="a", after_token_ids=(5,)))
