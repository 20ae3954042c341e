"""The request plane's wire format: length-prefixed msgpack frames over TCP.

A frame is a 4-byte big-endian body length followed by one msgpack-encoded
`Frame`. Many request streams share one connection; every frame names its
stream. Frontend -> worker: `Call` (start generating), `Cancel`, `Rpc` (health,
load, KV snapshot). Worker -> frontend: `Out` (an `EngineOutput` delta), `Fail`
(the stream ended with an error; `retryable` says whether another worker may
take the request over), `Reply` (the answer to an `Rpc`).

The frames are msgspec structs encoded as arrays with an integer tag, so a
token delta costs a few bytes of overhead. Append new fields at the end with a
default; new frame kinds get new tags.
"""

from __future__ import annotations

import struct

import msgspec

from dynamo_gateway.protocol.engine import EngineOutput, EngineRequest

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024  # a larger frame means a corrupt or hostile peer


class Call(msgspec.Struct, tag=1, array_like=True):
    stream: int
    request: EngineRequest
    timeout_s: float | None = None  # the worker aborts the stream after this long


class Cancel(msgspec.Struct, tag=2, array_like=True):
    stream: int


class Rpc(msgspec.Struct, tag=3, array_like=True):
    stream: int
    method: str  # "health", "load", "kv_snapshot"


class Out(msgspec.Struct, tag=4, array_like=True):
    stream: int
    output: EngineOutput


class Fail(msgspec.Struct, tag=5, array_like=True):
    stream: int
    message: str
    # True when the request never ran to a result here and may be resent elsewhere
    # (the worker is draining, shutting down, or lost its engine).
    retryable: bool = False
    # The engine refused the request itself (a `ClientError`: e.g. a constraint it
    # cannot honour): its HTTP status and `param`, so the client gets that 4xx.
    client_status: int | None = None
    param: str | None = None


class Reply(msgspec.Struct, tag=6, array_like=True):
    stream: int
    result: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil
    error: str | None = None


Frame = Call | Cancel | Rpc | Out | Fail | Reply


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; the connection must close."""


class FrameCodec:
    """Encodes frames and cuts a byte stream back into frames (no I/O)."""

    __slots__ = ("_buf", "_decoder", "_encoder")

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Frame)
        self._buf = bytearray()

    def encode(self, frame: Frame, out: bytearray) -> None:
        """Append `frame`, length prefix included, to `out`."""
        start = len(out)
        out.extend(b"\0\0\0\0")
        self._encoder.encode_into(frame, out, start + 4)
        HEADER.pack_into(out, start, len(out) - start - 4)

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by `data`; raises `FrameError` on garbage."""
        if self._buf:
            self._buf.extend(data)
            data = bytes(self._buf)  # decoded `Raw` fields point into it: keep it immutable
            self._buf.clear()
        frames: list[Frame] = []
        pos = 0
        end = len(data)
        view = memoryview(data)
        decode = self._decoder.decode
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(data, pos)
            if size > MAX_FRAME_BYTES:
                raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
            if end - pos - 4 < size:
                break
            try:
                frames.append(decode(view[pos + 4 : pos + 4 + size]))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise FrameError(f"undecodable frame: {exc}") from None
            pos += 4 + size
        if pos < end:
            self._buf.extend(view[pos:])
        return frames


def encode_result(value: object) -> msgspec.Raw:
    """An RPC result as the raw msgpack a `Reply` carries."""
    return msgspec.Raw(msgspec.msgpack.encode(value))
