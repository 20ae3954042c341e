"""The paged KV cache: one tensor whose blocks are the `BlockManager`'s block ids.

Layout ``kv[layer, 0 = key | 1 = value, block, offset, kv_head, head_dim]``: the
token at slot ``block * block_size + offset`` of every layer lives in one row of
each layer's flattened ``[num_blocks * block_size, kv_heads, head_dim]`` view.
Keys are stored after the rotary embedding, so a cached block never needs to be
touched again.

The tensor starts zeroed. Attention reads whole blocks, so the unused tail of a
sequence's last block is read too (and masked out with a zero probability):
every slot must hold a finite value, since 0 * NaN = NaN. Zeros at the start,
and only K/V the model computed afterwards, keep it so; never fill it with
garbage (``torch.empty``) or write into a block another sequence still reads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynamo_gateway.engines.reference.config import ModelConfig

__all__ = ["MIN_BLOCKS", "PagedKVCache", "auto_num_blocks", "available_memory_bytes"]

MIN_BLOCKS = 16


class PagedKVCache:
    """K/V of every layer for ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        memory: np.ndarray[Any, Any] | None = None,
    ) -> None:
        """``memory``: a zeroed host uint8 array of exactly the cache's bytes to build it on
        (shared memory for a KV transport, see `dynamo_gateway.disagg`); default: its own."""
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) < 1:
            raise ValueError("every KV cache dimension must be positive")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        if memory is None:
            self.kv = torch.zeros(shape, dtype=dtype, device=self.device)
        else:
            if self.device.type != "cpu":
                raise ValueError("a KV cache on given memory must be on the CPU")
            self.kv = torch.from_numpy(memory).view(dtype).view(shape)
        num_slots = num_blocks * block_size
        # Views made once, so that a step spends no dispatches on reshaping:
        # per layer, keys and values by slot ([2, num_slots, kv_heads, head_dim]) ...
        self.slot_views: list[torch.Tensor] = [
            self.kv[i].view(2, num_slots, num_kv_heads, head_dim) for i in range(num_layers)
        ]
        # ... and both by block ([2, num_blocks, block_size * kv_heads * head_dim]).
        self.block_views: list[torch.Tensor] = [
            self.kv[i].view(2, num_blocks, block_size * num_kv_heads * head_dim)
            for i in range(num_layers)
        ]

    def host_bytes(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The cache as host bytes ``[layers * 2, num_blocks, page_bytes]`` (CPU only):
        the `KvMemory` array that KV transports read and write."""
        if self.device.type != "cpu":
            raise ValueError("KV transfers need the reference engine's cache on the CPU")
        planes = self.num_layers * 2
        array: np.ndarray[Any, np.dtype[np.uint8]] = (
            self.kv.view(torch.uint8).view(planes, self.num_blocks, -1).numpy()
        )
        return array

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return int(self.kv.numel()) * int(self.kv.element_size())

    @staticmethod
    def bytes_per_block(
        *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes that one block takes across all layers, keys and values."""
        element = torch.empty((), dtype=dtype).element_size()
        return int(num_layers * 2 * block_size * num_kv_heads * head_dim * element)

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        memory: np.ndarray[Any, Any] | None = None,
    ) -> PagedKVCache:
        """A cache shaped for `config`'s layers and KV heads."""
        return cls(
            num_layers=config.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            dtype=dtype,
            device=device,
            memory=memory,
        )


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return 0


def auto_num_blocks(
    config: ModelConfig,
    *,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_fraction: float,
    max_gb: float,
) -> int:
    """How many KV blocks to allocate when the settings do not say.

    ``memory_fraction`` of the free memory, capped at ``max_gb`` GiB. If the cap
    leaves less than one full ``max_position_embeddings`` sequence but the
    fraction of free memory can hold one, the cache grows to hold it: a cache
    that cannot fit a single maximal request is of no use. Never below
    `MIN_BLOCKS`.
    """
    per_block = PagedKVCache.bytes_per_block(
        num_layers=config.num_layers,
        block_size=block_size,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=dtype,
    )
    by_fraction = int(available_memory_bytes(device) * memory_fraction) // per_block
    blocks = min(by_fraction, int(max_gb * 2**30) // per_block)
    one_sequence = math.ceil(config.max_position_embeddings / block_size)
    if blocks < one_sequence:
        blocks = max(blocks, min(one_sequence, by_fraction))
    return max(blocks, MIN_BLOCKS)
