"""The reference model against Hugging Face transformers, and against itself.

Every model fixture (the demo Llama, a Qwen2 with q/k/v biases and tied
embeddings, Llama-3.1 and linear rope scaling, Mistral with and without a
sliding window) must give transformers' logits and greedy tokens. The paged
machinery must not change results: a sequence gives the same logits alone or
batched with others, prefilled at once or in chunks, and with a shared cached
prefix or recomputed from scratch.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynamo_gateway.engines.reference.batch import ForwardBatch, SeqInput
from dynamo_gateway.engines.reference.config import ModelConfig
from dynamo_gateway.engines.reference.kv_cache import PagedKVCache
from dynamo_gateway.engines.reference.model import ReferenceModel
from dynamo_gateway.errors import ConfigError

# Between them: GQA and MHA, q/k/v and o_proj biases, tied and untied heads, head_dim
# both equal to and unlike hidden / heads, plain, llama3 and linear rope, a sliding window.
MODELS = [
    "demo_model",
    "qwen2_model",
    "llama3_rope_model",
    "linear_rope_model",
    "mistral_model",
    "mistral_window_model",
]
ATOL = 1e-4  # float32; the observed gap to transformers is ~3e-6
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Pair:
    ours: ReferenceModel
    hf: Any  # a transformers PreTrainedModel in eval mode
    vocab: int


@cache
def _load(path: Path) -> Pair:
    from transformers import AutoModelForCausalLM

    ours = ReferenceModel.load(path, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # generate() would stop at the checkpoint's EOS, while our greedy loop runs on.
    hf.generation_config.eos_token_id = None
    return Pair(ours, hf, ours.config.vocab_size)


@pytest.fixture(params=MODELS)
def pair(request: pytest.FixtureRequest) -> Pair:
    return _load(request.getfixturevalue(request.param))


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def hf_logits(pair: Pair, tokens: Sequence[int]) -> torch.Tensor:
    """transformers' logits for every position of `tokens`: [len, vocab]."""
    with torch.no_grad():
        return pair.hf(torch.tensor([list(tokens)])).logits[0].float()


class Allocator:
    """Sequential block ids, handed out on demand: tables of several sequences interleave."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.next = 0

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        while len(table) * self.block_size < num_tokens:
            table.append(self.next)
            self.next += 1
        return table


def new_cache(model: ReferenceModel, block_size: int, num_blocks: int = 160) -> PagedKVCache:
    return model.new_cache(num_blocks=num_blocks, block_size=block_size)


def step(
    model: ReferenceModel, cache: PagedKVCache, seqs: list[SeqInput], block_size: int
) -> torch.Tensor:
    batch = ForwardBatch.build(seqs=seqs, block_size=block_size, device=CPU)
    return model.forward(batch, cache)


def greedy(
    model: ReferenceModel, prompts: list[list[int]], *, new_tokens: int, block_size: int
) -> list[list[int]]:
    """Generate for all prompts together: one batched prefill, then batched decode steps."""
    cache = new_cache(model, block_size)
    alloc = Allocator(block_size)
    tables: list[list[int]] = [[] for _ in prompts]
    seqs = [SeqInput(p, 0, alloc.grow(tables[i], len(p))) for i, p in enumerate(prompts)]
    nxt = step(model, cache, seqs, block_size).argmax(-1).tolist()
    outs: list[list[int]] = [[t] for t in nxt]
    for n in range(new_tokens - 1):
        seqs = []
        for i, p in enumerate(prompts):
            pos = len(p) + n
            seqs.append(SeqInput([nxt[i]], pos, alloc.grow(tables[i], pos + 1)))
        nxt = step(model, cache, seqs, block_size).argmax(-1).tolist()
        for out, t in zip(outs, nxt, strict=True):
            out.append(t)
    return outs


def hf_greedy(pair: Pair, tokens: list[int], new_tokens: int) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
    )
    ids = torch.tensor([tokens])
    out = pair.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    generated: list[int] = out[0, len(tokens) :].tolist()
    assert len(generated) == new_tokens
    return generated


# -- transformers equivalence ---------------------------------------------------------------


def test_prefill_logits_match_transformers(pair: Pair) -> None:
    tokens = prompt(150, pair.vocab)  # past 64 (llama3's original context) and 8 (the window)
    cache = new_cache(pair.ours, 16)
    batch = ForwardBatch.build(
        seqs=[SeqInput(tokens, 0, list(range(10)))], block_size=16, device=CPU
    )
    expected = hf_logits(pair, tokens)
    last = pair.ours.forward(batch, cache)
    assert last.shape == (1, pair.vocab) and last.dtype == torch.float32
    torch.testing.assert_close(last[0], expected[-1], atol=ATOL, rtol=0)

    every_row = replace(batch, logits_indices=torch.arange(len(tokens)))
    got = pair.ours.forward(every_row, new_cache(pair.ours, 16))
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [16, 4])
@pytest.mark.parametrize(
    "model_name",
    ["demo_model", "qwen2_model", "llama3_rope_model", "linear_rope_model", "mistral_window_model"],
)
def test_greedy_generation_matches_transformers(
    request: pytest.FixtureRequest, model_name: str, block_size: int
) -> None:
    pair = _load(request.getfixturevalue(model_name))
    # Lengths below, at and across block boundaries, decoded together in one batch.
    lengths = [1, 5, 16, 17, 40]
    prompts = [prompt(n, pair.vocab, seed=n) for n in lengths]
    ours = greedy(pair.ours, prompts, new_tokens=24, block_size=block_size)
    for tokens, generated in zip(prompts, ours, strict=True):
        assert generated == _hf_greedy_cached(pair, tuple(tokens), 24), len(tokens)


@cache
def _hf_greedy_cached(pair: Pair, tokens: tuple[int, ...], new_tokens: int) -> list[int]:
    return hf_greedy(pair, list(tokens), new_tokens)


def test_rope_scaling_matters(llama3_rope_model: Path, linear_rope_model: Path) -> None:
    """Guard against a test that cannot fail: scaled rope really changes far positions."""
    for path in (llama3_rope_model, linear_rope_model):
        model = _load(path).ours
        config = json.loads((path / "config.json").read_text())
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": model.config.rope_theta}
        plain_dir = path.parent / f"{path.name}-plain"
        if not plain_dir.exists():
            shutil.copytree(path, plain_dir)
            (plain_dir / "config.json").write_text(json.dumps(config))
        plain = ReferenceModel.load(plain_dir, device="cpu")
        tokens = prompt(100, model.config.vocab_size)
        seqs = [SeqInput(tokens, 0, list(range(7)))]
        a = step(model, new_cache(model, 16), seqs, 16)
        b = step(plain, new_cache(plain, 16), seqs, 16)
        assert (a - b).abs().max() > 1e-2


# -- paged-cache invariants -----------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["demo_model", "qwen2_model"])
@pytest.mark.parametrize("continuation", [True, False], ids=["two-prefills", "one-prefill"])
def test_batched_equals_alone(
    request: pytest.FixtureRequest, model_name: str, continuation: bool
) -> None:
    model = _load(request.getfixturevalue(model_name)).ours
    vocab = model.config.vocab_size
    bs = 4
    cache = new_cache(model, bs)
    alloc = Allocator(bs)
    # Three sequences already in the cache (prefilled alone) ...
    history = {name: prompt(n, vocab, seed=n) for name, n in [("a", 21), ("b", 6), ("d", 9)]}
    tables = {name: alloc.grow([], len(t) + 3) for name, t in history.items()}
    for name, tokens in history.items():
        step(model, cache, [SeqInput(tokens, 0, tables[name])], bs)
    # ... then one step mixing decodes, a fresh prefill and a multi-token continuation.
    c_prompt = prompt(13, vocab, seed=13)
    tables["c"] = alloc.grow([], 13)
    mixed = [
        SeqInput([7], len(history["a"]), tables["a"]),
        SeqInput(c_prompt, 0, tables["c"]),
        SeqInput([8], len(history["b"]), tables["b"]),
        SeqInput([9, 10, 11], len(history["d"]), tables["d"]),
    ]
    if not continuation:
        mixed.pop()  # the fresh prefill is then the step's only multi-token sequence
    before = cache.kv.clone()
    together = step(model, cache, mixed, bs)
    assert together.shape == (len(mixed), vocab)
    for row, seq in enumerate(mixed):
        cache.kv.copy_(before)
        alone = step(model, cache, [seq], bs)
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=0)
    # And both agree with transformers on the full sequences.
    pair = _load(request.getfixturevalue(model_name))
    full = {"a": history["a"] + [7], "c": c_prompt, "b": history["b"] + [8]}
    full["d"] = history["d"] + [9, 10, 11]
    for row, name in enumerate(["a", "c", "b", "d"][: len(mixed)]):
        torch.testing.assert_close(
            together[row], hf_logits(pair, full[name])[-1], atol=ATOL, rtol=0
        )


def test_logits_only_for_wanted_rows(demo_model: Path) -> None:
    model = _load(demo_model).ours
    tokens = prompt(30, model.config.vocab_size)
    seqs = [
        SeqInput(tokens[:20], 0, [0, 1], want_logits=False),
        SeqInput(tokens[:5], 0, [2]),
    ]
    batch = ForwardBatch.build(seqs=seqs, block_size=16, device=CPU)
    assert batch.logits_indices.tolist() == [24]
    logits = model.forward(batch, new_cache(model, 16))
    assert logits.shape == (1, model.config.vocab_size)
    expected = step(model, new_cache(model, 16), [SeqInput(tokens[:5], 0, [0])], 16)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name", ["demo_model", "mistral_window_model"])
def test_chunked_prefill_equals_one_prefill(
    request: pytest.FixtureRequest, model_name: str
) -> None:
    model = _load(request.getfixturevalue(model_name)).ours
    bs = 16
    tokens = prompt(45, model.config.vocab_size)
    table = list(range(4))

    one_cache = new_cache(model, bs)
    one = step(model, one_cache, [SeqInput(tokens, 0, table)], bs)

    chunk_cache = new_cache(model, bs)
    cuts = [0, 11, 30, 45]  # chunk ends inside blocks and across a block boundary
    for start, end in itertools.pairwise(cuts):
        last = end == len(tokens)
        seq = SeqInput(tokens[start:end], start, table, want_logits=last)
        logits = step(model, chunk_cache, [seq], bs)
        assert logits.shape[0] == int(last)
    torch.testing.assert_close(logits, one, atol=1e-5, rtol=0)
    # The caches hold the same K/V, so decoding continues identically.
    a, b = one, logits
    for pos in range(len(tokens), len(tokens) + 8):
        ta, tb = int(a.argmax()), int(b.argmax())
        assert ta == tb
        a = step(model, one_cache, [SeqInput([ta], pos, table)], bs)
        b = step(model, chunk_cache, [SeqInput([tb], pos, table)], bs)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_prefix_reuse_equals_recompute(qwen2_model: Path) -> None:
    model = _load(qwen2_model).ours
    bs = 16
    vocab = model.config.vocab_size
    first = prompt(40, vocab, seed=1)  # blocks 0, 1 full; block 2 partial
    second = first[:32] + prompt(13, vocab, seed=2)
    cache = new_cache(model, bs)
    step(model, cache, [SeqInput(first, 0, [0, 1, 2])], bs)
    shared = cache.kv[:, :, :2].clone()
    # The second sequence maps its first two blocks onto the first's and computes the rest.
    reused = step(model, cache, [SeqInput(second[32:], 32, [0, 1, 7, 5])], bs)
    recomputed = step(model, new_cache(model, bs), [SeqInput(second, 0, [3, 4, 5])], bs)
    torch.testing.assert_close(reused, recomputed, atol=1e-5, rtol=0)
    assert torch.equal(cache.kv[:, :, :2], shared)  # the shared blocks were not written


def test_reads_no_other_sequences_slots(demo_model: Path) -> None:
    """NaN everywhere but the sequences' own blocks: any stray read would poison logits."""
    model = _load(demo_model).ours
    bs = 4
    vocab = model.config.vocab_size
    cache = new_cache(model, bs, num_blocks=64)
    cache.kv.fill_(float("nan"))
    tables = {"long": [9, 3, 40, 12, 7, 30], "short": [50], "mid": [2, 61, 33]}
    for table in tables.values():
        cache.kv[:, :, table] = 0.0  # blocks a block manager handed out: finite contents
    long_p, short_p, mid_p = prompt(22, vocab, 1), prompt(2, vocab, 2), prompt(9, vocab, 3)
    step(model, cache, [SeqInput(long_p, 0, tables["long"])], bs)
    step(model, cache, [SeqInput(mid_p, 0, tables["mid"])], bs)
    # Decodes of very different lengths plus a prefill: padding must stay in-sequence.
    logits = step(
        model,
        cache,
        [
            SeqInput([1], 22, tables["long"]),
            SeqInput(short_p, 0, tables["short"]),
            SeqInput([2], 9, tables["mid"]),
        ],
        bs,
    )
    assert torch.isfinite(logits).all()


def test_context_beyond_max_positions_is_refused(demo_model: Path) -> None:
    model = _load(demo_model).ours
    limit = model.config.max_position_embeddings
    batch = ForwardBatch.build(
        seqs=[SeqInput([1], limit, list(range(limit // 16 + 1)))], block_size=16, device=CPU
    )
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward(batch, new_cache(model, 16, num_blocks=limit // 16 + 1))


def test_build_rejects_short_block_tables() -> None:
    with pytest.raises(ValueError, match="cannot hold 17 tokens"):
        ForwardBatch.build(seqs=[SeqInput([1] * 17, 0, [0])], block_size=16, device=CPU)
    with pytest.raises(ValueError, match="no new tokens"):
        ForwardBatch.build(seqs=[SeqInput([], 3, [0])], block_size=16, device=CPU)


def test_build_lays_out_slots_and_trims_tables() -> None:
    batch = ForwardBatch.build(
        seqs=[SeqInput([5, 6, 7], 3, [8, 2, 9]), SeqInput([4], 0, [6], want_logits=True)],
        block_size=4,
        device=CPU,
    )
    assert batch.positions.tolist() == [3, 4, 5, 0]
    assert batch.slot_mapping.tolist() == [8 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 6 * 4]
    assert batch.query_lens == [3, 1] and batch.context_lens == [6, 1]
    assert batch.block_tables == [[8, 2], [6]]  # block 9 is not needed yet
    assert batch.logits_indices.tolist() == [2, 3]
    assert not batch.is_decode


# -- loading errors -------------------------------------------------------------------------


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path: Path, edit: Any) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(demo_model: Path, tmp_path: Path) -> None:
    path = _copy_model(demo_model, tmp_path / "m")
    _edit_weights(path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(ConfigError, match=r"1 missing tensor\(s\): model\.layers\.2\.mlp\.up_proj"):
        ReferenceModel.load(path, device="cpu")


def test_misshaped_tensor_is_named(demo_model: Path, tmp_path: Path) -> None:
    path = _copy_model(demo_model, tmp_path / "m")

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight"] = t["model.norm.weight"][:64].clone()

    _edit_weights(path, shrink)
    with pytest.raises(
        ConfigError, match=r"model\.norm\.weight has shape \[64\], expected \[128\]"
    ):
        ReferenceModel.load(path, device="cpu")


def test_missing_bias_of_qwen2_is_named(qwen2_model: Path, tmp_path: Path) -> None:
    path = _copy_model(qwen2_model, tmp_path / "q")
    _edit_weights(path, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ConfigError, match=r"k_proj\.bias"):
        ReferenceModel.load(path, device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_unsupported_configs_are_refused(
    demo_model: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = _copy_model(demo_model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config.update(change)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        ReferenceModel.load(path, device="cpu")


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ReferenceModel.load(tmp_path, device="cpu")


def test_classic_config_dialect_is_read() -> None:
    """Pre-transformers-5 configs: top-level rope_theta, rope_scaling with "type", torch_dtype."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 100,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": True,
    }
    config = ModelConfig.from_dict(raw)
    assert config.architecture == "llama"
    assert (config.num_kv_heads, config.head_dim) == (4, 16)  # defaults from the head count
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.torch_dtype == "bfloat16" and config.tie_word_embeddings
    assert not config.attention_bias and config.sliding_window is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close(qwen2_model: Path, dtype: str) -> None:
    pair = _load(qwen2_model)
    model = ReferenceModel.load(qwen2_model, device="cpu", dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    tokens = prompt(60, pair.vocab)
    cache = new_cache(model, 16)
    assert cache.kv.dtype == model.dtype
    step(model, cache, [SeqInput(tokens[:40], 0, [0, 1, 2, 3])], 16)
    logits = step(model, cache, [SeqInput(tokens[40:], 40, [0, 1, 2, 3])], 16)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], hf_logits(pair, tokens)[-1], atol=0.15, rtol=0)
