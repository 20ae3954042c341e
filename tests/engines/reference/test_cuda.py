"""The reference engine on CUDA (skipped without an NVIDIA GPU; CI has none).

A larger random Llama (Llama-1B-like proportions, fewer layers) checked against
transformers on the same GPU in float32, then served through the engine in
bfloat16. Run on a GPU machine with ``pytest -m gpu --require-engines``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from .conftest import _build

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=2048,  # the demo tokenizer's
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rope_theta=500000.0,
        initializer_range=0.02,
        tie_word_embeddings=True,
    )
    return _build(tmp_path_factory.mktemp("models") / "big-llama", config, demo_model)


def test_cuda_logits_and_greedy_match_transformers(big_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    from dynamo_gateway.engines.reference.batch import ForwardBatch, SeqInput
    from dynamo_gateway.engines.reference.model import ReferenceModel

    cuda = torch.device("cuda")
    ours = ReferenceModel.load(big_llama, device="cuda", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(big_llama, dtype=torch.float32).to(cuda).eval()
    hf.generation_config.eos_token_id = None
    prompt = [(7 * i + 3) % 2000 + 5 for i in range(77)]
    cache = ours.new_cache(num_blocks=64, block_size=16)

    tokens = list(prompt)
    generated: list[int] = []
    start = 0
    for _ in range(16):
        new = tokens[start:]
        table = list(range((len(tokens) + 15) // 16))
        batch = ForwardBatch.build(seqs=[SeqInput(new, start, table)], block_size=16, device=cuda)
        logits = ours.forward(batch, cache)
        if start == 0:
            with torch.inference_mode():
                ref = hf(torch.tensor([prompt], device=cuda)).logits[0, -1].float()
            torch.testing.assert_close(logits[0], ref, atol=2e-3, rtol=1e-3)
        start = len(tokens)
        nxt = int(logits[0].argmax())
        tokens.append(nxt)
        generated.append(nxt)
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt], device=cuda),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=cuda),
            max_new_tokens=16,
            do_sample=False,
        )
    assert generated == out[0, len(prompt) :].tolist()


def test_cuda_engine_serves_bfloat16(big_llama: Path) -> None:
    from dynamo_gateway.engines.base import EngineContext
    from dynamo_gateway.engines.reference.engine import ReferenceEngine
    from dynamo_gateway.models.card import ModelCard
    from dynamo_gateway.protocol.engine import EngineRequest, SamplingParams
    from dynamo_gateway.settings import load_settings

    settings = load_settings(
        reference={"device": "cuda", "dtype": "bfloat16"}, cache={"num_kv_blocks": 512}
    )

    async def main() -> list[int]:
        engine = ReferenceEngine(EngineContext(settings, ModelCard.load(big_llama), "gpu0"))
        await engine.start()
        try:

            async def one(i: int) -> int:
                req = EngineRequest(
                    request_id=f"r{i}",
                    prompt_token_ids=[5 + i, 17, 99, 1000] * 20,
                    sampling=SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
                )
                return sum([len(o.token_ids) async for o in engine.generate(req)])

            return list(await asyncio.gather(*(one(i) for i in range(8))))
        finally:
            await engine.aclose()

    assert asyncio.run(main()) == [32] * 8
