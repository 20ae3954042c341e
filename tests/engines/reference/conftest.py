"""Tiny random Hugging Face checkpoints for the reference model's equivalence tests.

Each fixture builds a model with transformers itself (fixed seed, float32) and
saves it with ``save_pretrained``, so the tests compare our loader and layers
against exactly what transformers would run. transformers initializes RMSNorm
weights to one and biases to zero, which would hide bugs in how we fold norm
weights or apply biases, so those are re-randomized; a larger init std than
HF's default spreads the logits, so that greedy decoding has clear winners.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

SEED = 1234
# Shared shape of the random models: small enough for a fast CPU test run.
TINY: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "initializer_range": 0.1,
    "rms_norm_eps": 1e-6,
}


def _randomize_norms_and_biases(model: Any) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))


def _build(out: Path, config: Any, demo_model: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms_and_biases(model)
    model.save_pretrained(out)
    # The demo tokenizer, for anyone who wants to serve these models by hand.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model / name, out / name)
    return out


@pytest.fixture(scope="session")
def qwen2_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """Qwen2-shaped: q/k/v biases and tied embeddings (like Qwen2-0.5B)."""
    from transformers import Qwen2Config

    config = Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=1000000.0)
    return _build(tmp_path_factory.mktemp("models") / "qwen2", config, demo_model)


@pytest.fixture(scope="session")
def llama3_rope_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """Llama with Llama-3.1 rope scaling; positions past 64 use the scaled bands."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **TINY,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=500000.0,
    )
    return _build(tmp_path_factory.mktemp("models") / "llama3", config, demo_model)


@pytest.fixture(scope="session")
def linear_rope_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """Llama with linear rope scaling, attention biases (o_proj too) and no GQA."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        **{**TINY, "num_key_value_heads": TINY["num_attention_heads"]},
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        attention_bias=True,
    )
    return _build(tmp_path_factory.mktemp("models") / "linear", config, demo_model)


@pytest.fixture(scope="session")
def mistral_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """Mistral without a sliding window (as v0.2+ ships), heads wider than hidden / heads."""
    from transformers import MistralConfig

    config = MistralConfig(**TINY, head_dim=32, sliding_window=None)
    return _build(tmp_path_factory.mktemp("models") / "mistral", config, demo_model)


@pytest.fixture(scope="session")
def mistral_window_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """Mistral with a sliding window of 8 tokens, much shorter than the test prompts."""
    from transformers import MistralConfig

    config = MistralConfig(**TINY, head_dim=16, sliding_window=8)
    return _build(tmp_path_factory.mktemp("models") / "mistral-window", config, demo_model)
