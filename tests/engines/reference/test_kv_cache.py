"""The paged KV cache tensor: shape, sizing, and where a token's K/V lands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynamo_gateway.engines.reference import kv_cache
from dynamo_gateway.engines.reference.attention import GatherSDPA
from dynamo_gateway.engines.reference.batch import ForwardBatch, SeqInput
from dynamo_gateway.engines.reference.config import ModelConfig
from dynamo_gateway.engines.reference.kv_cache import (
    MIN_BLOCKS,
    PagedKVCache,
    auto_num_blocks,
    available_memory_bytes,
)

CPU = torch.device("cpu")
GiB = 2**30


def tiny_config(**overrides: object) -> ModelConfig:
    fields: dict[str, object] = {
        "architecture": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def test_shape_dtype_and_zeroed() -> None:
    cache = PagedKVCache(
        num_layers=3,
        num_blocks=5,
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.bfloat16,
        device=CPU,
    )
    assert cache.kv.shape == (3, 2, 5, 4, 2, 8)
    assert cache.kv.dtype == torch.bfloat16
    assert (cache.num_blocks, cache.block_size, cache.num_slots) == (5, 4, 20)
    assert not cache.kv.any()
    assert cache.nbytes == 3 * 2 * 5 * 4 * 2 * 8 * 2
    # The per-layer views alias the tensor.
    cache.slot_views[1][0, 7] = 1.0
    assert cache.kv[1, 0, 1, 3].eq(1.0).all()


@pytest.mark.parametrize(("dtype", "element"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_bytes_per_block(dtype: torch.dtype, element: int) -> None:
    got = PagedKVCache.bytes_per_block(
        num_layers=4, block_size=16, num_kv_heads=2, head_dim=32, dtype=dtype
    )
    assert got == 4 * 2 * 16 * 2 * 32 * element
    cache = PagedKVCache(
        num_layers=4,
        num_blocks=3,
        block_size=16,
        num_kv_heads=2,
        head_dim=32,
        dtype=dtype,
        device=CPU,
    )
    assert cache.nbytes == 3 * got


def test_rejects_empty_dimensions() -> None:
    with pytest.raises(ValueError, match="positive"):
        PagedKVCache(
            num_layers=1,
            num_blocks=0,
            block_size=16,
            num_kv_heads=1,
            head_dim=8,
            dtype=torch.float32,
            device=CPU,
        )


def fake_memory(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda device: free)


def test_auto_num_blocks_takes_the_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(max_position_embeddings=64)
    per_block = 4 * 2 * 16 * 2 * 16 * 4  # layers * k/v * block * kv heads * head dim * fp32
    fake_memory(monkeypatch, 1000 * per_block)
    blocks = auto_num_blocks(
        config, block_size=16, dtype=torch.float32, device=CPU, memory_fraction=0.25, max_gb=4.0
    )
    assert blocks == 250


def test_auto_num_blocks_respects_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(max_position_embeddings=64)
    per_block = 4 * 2 * 16 * 2 * 16 * 4
    fake_memory(monkeypatch, 64 * GiB)
    blocks = auto_num_blocks(
        config, block_size=16, dtype=torch.float32, device=CPU, memory_fraction=0.5, max_gb=0.01
    )
    assert blocks == int(0.01 * GiB) // per_block


def test_auto_num_blocks_fits_one_full_sequence_when_the_fraction_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tiny_config(max_position_embeddings=4096)  # 256 blocks of 16
    per_block = 4 * 2 * 16 * 2 * 16 * 4
    fake_memory(monkeypatch, 4000 * per_block)
    kwargs = {"block_size": 16, "dtype": torch.float32, "device": CPU, "memory_fraction": 0.5}
    capped = 100 * per_block / GiB  # the cap alone would give 100 blocks
    assert auto_num_blocks(config, max_gb=capped, **kwargs) == 256  # type: ignore[arg-type]
    # But never beyond the fraction of free memory (0.5 * 400 = 200 blocks).
    fake_memory(monkeypatch, 400 * per_block)
    assert auto_num_blocks(config, max_gb=capped, **kwargs) == 200  # type: ignore[arg-type]


def test_auto_num_blocks_has_a_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_memory(monkeypatch, 0)
    blocks = auto_num_blocks(
        tiny_config(), block_size=16, dtype=torch.float32, device=CPU, memory_fraction=0.9, max_gb=1
    )
    assert blocks == MIN_BLOCKS


def test_available_memory_reads_meminfo(monkeypatch: pytest.MonkeyPatch) -> None:
    free = available_memory_bytes(CPU)
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        # Other processes move MemAvailable between reads: check it is within MemTotal.
        line = next(x for x in meminfo.read_text().splitlines() if x.startswith("MemTotal:"))
        assert 0 < free <= int(line.split()[1]) * 1024

    # Without /proc/meminfo, sysconf answers.
    def unreadable(self: Path, *args: object, **kwargs: object) -> str:
        raise OSError("no procfs")

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert available_memory_bytes(CPU) > 0


def test_new_tokens_land_in_their_block_and_offset() -> None:
    bs, kvh, hd = 4, 2, 8
    cache = PagedKVCache(
        num_layers=2,
        num_blocks=10,
        block_size=bs,
        num_kv_heads=kvh,
        head_dim=hd,
        dtype=torch.float32,
        device=CPU,
    )
    # Sequence 0 continues at position 5 (block 7, offset 1) over the boundary into block 2;
    # sequence 1 decodes at position 3 (block 4, offset 3).
    batch = ForwardBatch.build(
        seqs=[SeqInput([1, 2, 3, 4], 5, [3, 7, 2]), SeqInput([9], 3, [4])],
        block_size=bs,
        device=CPU,
    )
    expected_places = [(7, 1), (7, 2), (7, 3), (2, 0), (4, 3)]
    assert batch.slot_mapping.tolist() == [b * bs + o for b, o in expected_places]
    backend = GatherSDPA(num_heads=4, num_kv_heads=kvh, head_dim=hd, sliding_window=None)
    attend = backend.begin(batch, cache)
    kv = torch.arange(5 * 2 * kvh * hd, dtype=torch.float32).view(5, 2, kvh, hd) + 1
    q = torch.zeros(5, 4, hd)
    out = attend(1, q, kv)
    assert out.shape == (5, 4 * hd)
    for token, (block, offset) in enumerate(expected_places):
        assert torch.equal(cache.kv[1, 0, block, offset], kv[token, 0])  # key
        assert torch.equal(cache.kv[1, 1, block, offset], kv[token, 1])  # value
    assert not cache.kv[0].any()  # another layer is untouched
    written = cache.kv[1].abs().sum(dim=(0, 3, 4)) > 0  # [blocks, offsets]
    assert int(written.sum()) == len(expected_places)
    # Zero queries attend uniformly: decode token 4 (position 3) averages positions 0..3
    # of block 4, of which only its own slot holds a value.
    expected = kv[4, 1].repeat_interleave(2, dim=0).flatten() / 4
    torch.testing.assert_close(out[4], expected)
