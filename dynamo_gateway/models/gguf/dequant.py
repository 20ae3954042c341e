"""GGUF tensor data to float arrays: dequantisation and llama.cpp's Q/K row order.

Pure numpy, no I/O. The block formats handled here (ggml's ``ggml-common.h``)::

    Q8_0  32 values: f16 scale d, 32 x int8 q          x = d * q
    Q4_0  32 values: f16 scale d, 16 bytes of nibbles   x = d * (q - 8)
    Q4_1  32 values: f16 scale d, f16 min m, 16 bytes   x = d * q + m

A nibble block stores values 0..15 in the low nibbles of its 16 bytes and
values 16..31 in the high nibbles. F32, F16 and BF16 are plain arrays. Other
types (K-quants, IQ) go through the ``gguf`` package's reference dequantiser.

llama.cpp's converter reorders the rows of each attention head's Q and K
projection from Hugging Face's "rotate half" layout to interleaved pairs;
:func:`unpermute_qk` restores the HF order so that the checkpoint runs on a
rotate-half RoPE.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dynamo_gateway.errors import ConfigError

__all__ = ["BLOCK_FORMATS", "dequantize", "unpermute_qk"]

_QK = 32  # values per block in the 8- and 4-bit formats
# ggml type id -> (name, bytes per 32-value block); F32/F16/BF16 are not blocked.
BLOCK_FORMATS = {8: ("Q8_0", 34), 2: ("Q4_0", 18), 3: ("Q4_1", 20)}
_PLAIN = {0: "F32", 1: "F16", 30: "BF16"}


def dequantize(
    data: npt.NDArray[np.generic], ggml_type: int, shape: tuple[int, ...]
) -> npt.NDArray[np.float32]:
    """Decode one tensor's raw data into a float32 array of `shape` (numpy order).

    `data` is what the file holds for the tensor (any shape; its bytes are
    what count), `ggml_type` the GGML type id, `shape` the logical shape with
    the innermost dimension last. Raises `ConfigError` when the byte count does
    not fit the shape or the type is unknown.
    """
    count = int(np.prod(shape))
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if ggml_type in _PLAIN:
        values = _plain(raw, ggml_type, count)
    elif ggml_type in BLOCK_FORMATS:
        name, block_bytes = BLOCK_FORMATS[ggml_type]
        if count % _QK or raw.size != count // _QK * block_bytes:
            raise ConfigError(f"{name} tensor of shape {list(shape)} has {raw.size} bytes")
        blocks = raw.reshape(-1, block_bytes)
        values = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}[name](blocks)
    else:
        values = _via_gguf(raw, ggml_type)
    if values.size != count:
        raise ConfigError(f"tensor of shape {list(shape)} decoded to {values.size} values")
    return values.reshape(shape)


def unpermute_qk(weight: npt.NDArray[np.float32], num_heads: int) -> npt.NDArray[np.float32]:
    """Undo llama.cpp's Q/K row permutation for a ``[heads * head_dim, ...]`` weight or bias.

    The converter maps each head's rows ``[half0 | half1]`` to interleaved
    ``(half0[i], half1[i])`` pairs; this maps them back.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ConfigError(f"cannot split {rows} rows into {num_heads} heads of rotary pairs")
    rest = weight.shape[1:]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _plain(raw: npt.NDArray[np.uint8], ggml_type: int, count: int) -> npt.NDArray[np.float32]:
    width = 4 if ggml_type == 0 else 2
    if raw.size != count * width:
        raise ConfigError(f"{_PLAIN[ggml_type]} tensor of {count} values has {raw.size} bytes")
    if ggml_type == 0:
        # A copy: `raw` may be a read-only view of the memory-mapped file.
        return raw.view("<f4").astype(np.float32)
    if ggml_type == 1:
        return raw.view("<f2").astype(np.float32)
    # BF16 is the top half of an IEEE float32.
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _scale(blocks: npt.NDArray[np.uint8], offset: int) -> npt.NDArray[np.float32]:
    """The f16 at byte `offset` of every block, as a float32 column."""
    return blocks[:, offset : offset + 2].copy().view("<f2").astype(np.float32)


def _nibbles(packed: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """[blocks, 16] packed bytes -> [blocks, 32] values (low nibbles first)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


def _q8_0(blocks: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (_scale(blocks, 0) * q).reshape(-1)


def _q4_0(blocks: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return (_scale(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)).reshape(-1)


def _q4_1(blocks: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    return (_scale(blocks, 0) * _nibbles(blocks[:, 4:]) + _scale(blocks, 2)).reshape(-1)


def _via_gguf(raw: npt.NDArray[np.uint8], ggml_type: int) -> npt.NDArray[np.float32]:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    try:
        qtype = GGMLQuantizationType(ggml_type)
        result = gguf_dequantize(raw, qtype)
    except (ValueError, NotImplementedError) as exc:
        raise ConfigError(f"GGUF tensor type {ggml_type} cannot be dequantised: {exc}") from None
    return np.asarray(result, dtype=np.float32).reshape(-1)
