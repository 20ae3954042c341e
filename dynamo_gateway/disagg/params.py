"""`kv_transfer_params`: the engine-neutral handoff between a prefill and a decode leg.

The same idea and shape as vLLM's: a plain JSON/msgpack mapping on
`EngineRequest` and `EngineOutput` that the frontend carries from one leg to
the other without reading more than the flags below.

* Prefill leg request: ``{"do_remote_decode": true}`` (and ``max_tokens=1``).
* Prefill leg final output: `PrefillDone` as a dict: who holds the blocks
  (``remote_engine_id``), the ``transfer_id``, ``remote_block_ids`` (the
  blocks of the first ``num_tokens`` prompt tokens, in order), the ``layout``,
  ``transports`` (name -> descriptor: how to reach them) and ``expires_at``
  (Unix time after which the source frees them).
* Decode leg request: that dict as it came (``do_remote_prefill: true``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest, FinishReason

__all__ = ["DO_REMOTE_DECODE", "DO_REMOTE_PREFILL", "PrefillDone", "parse_prefill_done"]

DO_REMOTE_DECODE = "do_remote_decode"
DO_REMOTE_PREFILL = "do_remote_prefill"


class PrefillDone(msgspec.Struct, kw_only=True):
    """What a prefill leg hands to its decode leg (see the module docstring)."""

    do_remote_prefill: bool = True
    remote_engine_id: str
    transfer_id: str
    remote_block_ids: list[int]
    num_tokens: int
    layout: dict[str, Any]
    transports: dict[str, dict[str, Any]]
    expires_at: float

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


def parse_prefill_done(params: object) -> PrefillDone:
    """Decode a decode leg's params; raises ValueError naming what is wrong."""
    try:
        done = msgspec.convert(params, PrefillDone)
    except msgspec.ValidationError as exc:
        raise ValueError(f"malformed kv_transfer_params: {exc}") from None
    if done.num_tokens < 1 or not done.remote_block_ids:
        raise ValueError("kv_transfer_params name no blocks")
    return done


def prefill_leg(request: EngineRequest) -> EngineRequest:
    """The prefill leg of `request`: one new token, its KV kept for a remote decode."""
    sampling = msgspec.structs.replace(
        request.sampling, max_tokens=1 + len(request.resumed_token_ids)
    )
    return msgspec.structs.replace(
        request, sampling=sampling, kv_transfer_params={DO_REMOTE_DECODE: True}
    )


def decode_leg(
    request: EngineRequest, first_tokens: list[int], params: dict[str, Any] | None
) -> EngineRequest:
    """The decode leg of `request`: the prefill's tokens resumed, its handoff attached."""
    resumed = [*request.resumed_token_ids, *first_tokens]
    return msgspec.structs.replace(request, resumed_token_ids=resumed, kv_transfer_params=params)


def prefill_leg_failed(last: EngineOutput, tokens: list[int]) -> bool:
    """Whether a prefill leg that finished with `last` (after `tokens`) failed.

    An error or abort failed; so did a leg with neither tokens nor a handoff. A
    handoff without tokens is an engine whose decode side computes the first
    token itself (SGLang's bootstrap room): its decode leg yields every token.
    """
    if last.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
        return True
    return not tokens and last.kv_transfer_params is None


async def release_abandoned(params: dict[str, Any]) -> bool:
    """Unpin a handoff nobody will pull (the frontend's side, best effort).

    Reaches the source through the in-process registry or a tcp / shm control
    listener named in the handoff; True if the source freed the blocks.
    """
    from dynamo_gateway.disagg.transports.inprocess import InprocessTransport
    from dynamo_gateway.disagg.transports.tcp import new_client, release_over_tcp
    from dynamo_gateway.errors import KvTransferError

    transports = params.get("transports") or {}
    tid = str(params.get("transfer_id", ""))
    try:
        local = transports.get("inprocess")
        if isinstance(local, dict) and InprocessTransport.reachable(local):
            await InprocessTransport.release_peer(local, tid)
            return True
        for name in ("tcp", "shm"):
            desc = transports.get(name)
            control = desc.get("control", desc) if isinstance(desc, dict) else None
            if isinstance(control, dict) and "port" in control:
                client = new_client()
                try:
                    await release_over_tcp(client, control, tid)
                finally:
                    client.close()
                return True
    except (KvTransferError, OSError):
        pass
    return False


def wants_remote_decode(params: dict[str, Any] | None) -> bool:
    return bool(params and params.get(DO_REMOTE_DECODE))


def is_remote_prefill(params: dict[str, Any] | None) -> bool:
    return bool(params and params.get(DO_REMOTE_PREFILL))
