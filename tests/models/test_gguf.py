"""GGUF checkpoints: dequantisation, the Q/K row order, metadata -> config/tokenizer/template,
and the demo model round-tripped through a llama.cpp-style GGUF file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from dynamo_gateway.engines.base import EngineContext
from dynamo_gateway.engines.reference.config import ModelConfig
from dynamo_gateway.engines.reference.engine import ReferenceEngine
from dynamo_gateway.engines.reference.weights import expected_shapes, load_weights
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.models.gguf import GgufModel, find_gguf
from dynamo_gateway.models.gguf.dequant import dequantize, unpermute_qk
from dynamo_gateway.models.gguf.tokenizer import tokenizer_json
from dynamo_gateway.preprocess import ChatTemplate, Tokenizer
from dynamo_gateway.settings import load_settings
from dynamo_gateway.testing import collect, engine_request, tokens_of

from .gguf_files import llama_cpp_permute, write_gguf

Q = GGMLQuantizationType
ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
# Largest error of a quantised weight vs float32, relative to the row's max |w|.
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.08}


def _f16(x: float) -> bytes:
    return np.float16(x).tobytes()


# -- dequantisation --------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_the_gguf_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(int(qtype))
    data = rng.standard_normal((6, 96)).astype(np.float32) * 3
    raw = quantize(data, qtype)
    ours = dequantize(raw, int(qtype), (6, 96))
    assert ours.dtype == np.float32 and ours.shape == (6, 96)
    np.testing.assert_array_equal(ours, gguf_dequantize(raw, qtype).reshape(6, 96))


def test_q8_0_block_by_hand() -> None:
    q = np.arange(-16, 16, dtype=np.int8)
    block = np.frombuffer(_f16(0.25) + q.tobytes(), dtype=np.uint8)
    np.testing.assert_array_equal(dequantize(block, 8, (32,)), 0.25 * q.astype(np.float32))


def test_q4_0_block_by_hand() -> None:
    low = np.arange(16, dtype=np.uint8)  # values 0..15
    high = np.arange(15, -1, -1, dtype=np.uint8)  # values 16..31
    block = np.frombuffer(_f16(0.5) + (low | (high << 4)).tobytes(), dtype=np.uint8)
    expected = 0.5 * (np.concatenate([low, high]).astype(np.float32) - 8)
    np.testing.assert_array_equal(dequantize(block, 2, (32,)), expected)


def test_q4_1_block_by_hand() -> None:
    nibbles = np.array([(i * 7) % 16 for i in range(32)], dtype=np.uint8)
    packed = nibbles[:16] | (nibbles[16:] << 4)
    block = np.frombuffer(_f16(0.125) + _f16(-1.5) + packed.tobytes(), dtype=np.uint8)
    expected = 0.125 * nibbles.astype(np.float32) - 1.5
    np.testing.assert_array_equal(dequantize(block, 3, (32,)), expected)


def test_bf16_is_the_top_half_of_float32() -> None:
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, 65280.0], dtype=np.float32)
    halves = (values.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(dequantize(halves, 30, (6,)), values)


@pytest.mark.parametrize(("ggml_type", "size"), [(0, 7), (1, 5), (8, 33), (2, 19), (3, 40)])
def test_wrong_byte_count_is_refused(ggml_type: int, size: int) -> None:
    with pytest.raises(ConfigError):
        dequantize(np.zeros(size, dtype=np.uint8), ggml_type, (32,))


def test_unknown_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot be dequantised"):
        dequantize(np.zeros(64, dtype=np.uint8), 9999, (32,))


@pytest.mark.parametrize(("heads", "head_dim", "cols"), [(1, 4, 3), (4, 8, 5), (3, 64, 2)])
def test_unpermute_inverts_llama_cpp_permute(heads: int, head_dim: int, cols: int) -> None:
    rng = np.random.default_rng(heads)
    weight = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(weight, heads), heads), weight)
    bias = weight[:, 0].copy()
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(bias, heads), heads), bias)
    # The permutation is not the identity, so the test can fail.
    assert not np.array_equal(llama_cpp_permute(weight, heads), weight) or head_dim == 2


def test_unpermute_rejects_rows_that_do_not_split() -> None:
    with pytest.raises(ConfigError, match="rotary pairs"):
        unpermute_qk(np.zeros((10, 2), dtype=np.float32), 4)


# -- tokenizer metadata ----------------------------------------------------------------


def test_only_byte_level_bpe_is_rebuilt() -> None:
    with pytest.raises(ConfigError, match="only byte-level BPE"):
        tokenizer_json({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ConfigError, match="pre-tokenizer 'mystery'"):
        tokenizer_json(
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
             "tokenizer.ggml.tokens": ["a"]}
        )  # fmt: skip


# -- the demo model through GGUF --------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_files(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[Q, Path]:
    root = tmp_path_factory.mktemp("gguf")
    types = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
    return {q: write_gguf(demo_model, root / f"demo-{q.name}.gguf", q) for q in types}


def test_config_from_gguf_equals_the_directory(demo_model: Path, gguf_files: dict[Q, Path]) -> None:
    ours = ModelConfig.from_dir(gguf_files[Q.F32])
    theirs = ModelConfig.from_dir(demo_model)
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                  "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                  "max_position_embeddings", "tie_word_embeddings", "attention_bias"):  # fmt: skip
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    card = ModelCard.load(gguf_files[Q.F32])
    assert card.served_name == "demo-F32"
    # GGUF holds one EOS id (the tokenizer's); generation_config.json may list more.
    assert set(card.eos_token_ids) <= set(ModelCard.load(demo_model).eos_token_ids)
    assert card.eos_token_ids == (Tokenizer.from_dir(demo_model).eos_token_id,)


TEXTS = [
    "Once upon a time, the quick brown fox",
    "numbers 0 12 345 6789 and 3.14159",
    "  spaces   and\ttabs\n\nnew lines\r\n",
    "café naïve 日本語 🎉 ünïcödé",
    "<|im_start|>user\nhello<|im_end|>\n",
    "",
]


def test_tokenizer_from_gguf_equals_tokenizer_json(
    demo_model: Path, gguf_files: dict[Q, Path]
) -> None:
    ours = Tokenizer.from_dir(gguf_files[Q.F32])
    theirs = Tokenizer.from_dir(demo_model)
    assert ours.vocab_size == theirs.vocab_size
    assert ours.special_token_ids == theirs.special_token_ids
    assert (ours.bos_token, ours.eos_token) == (theirs.bos_token, theirs.eos_token)
    for text in TEXTS:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip
                )


def test_chat_template_from_gguf_renders_the_same(
    demo_model: Path, gguf_files: dict[Q, Path]
) -> None:
    ours, theirs = ChatTemplate.from_dir(gguf_files[Q.F32]), ChatTemplate.from_dir(demo_model)
    assert ours is not None and theirs is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ours.render(messages, add_generation_prompt=True) == theirs.render(
        messages, add_generation_prompt=True
    )


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_weights_from_gguf(demo_model: Path, gguf_files: dict[Q, Path], qtype: Q) -> None:
    config = ModelConfig.from_dir(demo_model)
    cpu = torch.device("cpu")
    ours = load_weights(gguf_files[qtype], config, dtype=torch.float32, device=cpu)
    theirs = load_weights(demo_model, config, dtype=torch.float32, device=cpu)
    assert set(ours) == set(expected_shapes(config)) == set(theirs)
    for name, tensor in theirs.items():
        got = ours[name]
        assert got.shape == tensor.shape, name
        if qtype == Q.F32 or tensor.dim() == 1:
            assert torch.equal(got, tensor), name
        else:
            scale = tensor.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
            worst = float(((got - tensor).abs() / scale).max())
            assert worst <= TOLERANCE[qtype], (name, worst)
            assert not torch.equal(got, tensor) or qtype == Q.F16  # really quantised


async def test_engine_greedy_output_from_gguf_equals_the_directory(
    demo_model: Path, gguf_files: dict[Q, Path]
) -> None:
    settings = load_settings(None, reference={"device": "cpu", "num_threads": 1},
                             cache={"num_kv_blocks": 64})  # fmt: skip
    prompt = Tokenizer.from_dir(demo_model).encode("The river bank under a pale sky")
    outputs = []
    for path in (demo_model, gguf_files[Q.F32]):
        engine = ReferenceEngine(EngineContext(settings, ModelCard.load(path), "w"))
        await engine.start()
        try:
            request = engine_request("r", prompt, 24, temperature=0.0, ignore_eos=True)
            outputs.append(tokens_of(await collect(engine, request)))
        finally:
            await engine.aclose()
    assert len(outputs[0]) == 24 and outputs[0] == outputs[1]


def test_find_gguf_rules(tmp_path: Path, gguf_files: dict[Q, Path]) -> None:
    file = gguf_files[Q.F32]
    assert find_gguf(file) == file
    assert find_gguf(tmp_path) is None  # empty directory
    only = tmp_path / "only"
    only.mkdir()
    (only / "m.gguf").write_bytes(file.read_bytes())
    assert find_gguf(only) == only / "m.gguf"
    (only / "config.json").write_text("{}")
    assert find_gguf(only) is None  # a HF directory wins
    (only / "config.json").unlink()
    (only / "other.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match="several GGUF files"):
        find_gguf(only)
    (tmp_path / "notes.txt").write_text("x")
    assert find_gguf(tmp_path / "notes.txt") is None


def test_unsupported_architecture_and_broken_files(demo_model: Path, tmp_path: Path) -> None:
    gpt = write_gguf(demo_model, tmp_path / "gpt.gguf", arch="gpt2")
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        GgufModel.open(gpt)
    spm = write_gguf(demo_model, tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(ConfigError, match="only byte-level BPE"):
        Tokenizer.from_dir(spm)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="cannot read GGUF"):
        GgufModel.open(junk)
