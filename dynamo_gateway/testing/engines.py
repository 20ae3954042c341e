"""Driving an `Engine` directly: build a request, read a stream to its end."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynamo_gateway.engines.base import Engine
from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, SamplingParams

__all__ = ["collect", "engine_request", "tokens_of"]


def engine_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 16,
    *,
    resumed: Sequence[int] = (),
    **sampling: Any,
) -> EngineRequest:
    """An `EngineRequest`; keyword arguments are `SamplingParams` fields."""
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
        resumed_token_ids=list(resumed),
    )


async def collect(engine: Engine, request: EngineRequest) -> list[EngineOutput]:
    """Every output of one request, to the end."""
    return [out async for out in engine.generate(request)]


def tokens_of(outputs: Sequence[EngineOutput]) -> list[int]:
    """The tokens of a stream of deltas, in order."""
    return [t for out in outputs for t in out.token_ids]
