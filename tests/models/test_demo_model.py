"""The offline demo model: complete, deterministic, and self-consistent."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

import dynamo_gateway
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.models.corpus import generate_corpus
from dynamo_gateway.models.demo import build_demo_model
from dynamo_gateway.preprocess import ChatTemplate, Tokenizer

FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
REPO_ROOT = Path(dynamo_gateway.__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


def _read(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _digests(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in FILES}


def test_all_files_are_written(demo_dir: Path) -> None:
    for name in FILES:
        assert (demo_dir / name).is_file(), name
    assert "random-weight" in (demo_dir / "README.md").read_text(encoding="utf-8")


def test_build_is_deterministic_across_processes(demo_dir: Path, tmp_path: Path) -> None:
    # Another process, hash seed and thread count: nothing may depend on them.
    env = dict(os.environ)
    env.update(
        PYTHONHASHSEED="12345",
        RAYON_NUM_THREADS="3",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    second = tmp_path / "again"
    code = (
        "import sys; from pathlib import Path;"
        "from dynamo_gateway.models.demo import build_demo_model;"
        "build_demo_model(Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(second)], check=True, env=env, timeout=120)
    assert _digests(second) == _digests(demo_dir)


def test_progress_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_demo_model(tmp_path / "m", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training" in captured.err
    assert "done" in captured.err


def test_corpus_is_deterministic_and_multilingual() -> None:
    corpus = generate_corpus()
    assert corpus == generate_corpus()
    assert generate_corpus(seed=1) != corpus
    encoded = corpus.encode("utf-8")
    assert len(encoded) < 4_000_000
    # Two-, three- and four-byte UTF-8 sequences all occur.
    assert "é" in corpus
    assert "日本語" in corpus
    assert "😀" in corpus
    assert "def " in corpus


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face LlamaForCausalLM parameter shapes, derived from config.json alone."""
    hidden = config["hidden_size"]
    vocab = config["vocab_size"]
    head_dim = config["head_dim"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    inter = config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def test_config_matches_the_weights(demo_dir: Path) -> None:
    import torch  # imported here: it is slow to import and only this test needs it

    config = _read(demo_dir / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32"
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    expected = _expected_shapes(config)
    with safe_open(str(demo_dir / "model.safetensors"), framework="pt") as weights:
        assert weights.metadata() == {"format": "pt"}
        assert set(weights.keys()) == set(expected)
        for name, shape in expected.items():
            tensor = weights.get_tensor(name)
            assert tuple(tensor.shape) == shape, name
            assert tensor.dtype == torch.float32, name
            if name.endswith("norm.weight"):
                assert torch.all(tensor == 1.0), name
            else:
                assert abs(float(tensor.std()) - 0.02) < 0.002, name
                assert abs(float(tensor.mean())) < 0.002, name
    # Different tensors get different random values.
    with safe_open(str(demo_dir / "model.safetensors"), framework="pt") as weights:
        first = weights.get_tensor("model.layers.0.mlp.up_proj.weight")
        second = weights.get_tensor("model.layers.0.mlp.gate_proj.weight")
    assert not torch.equal(first, second)


def test_config_matches_the_tokenizer(demo_dir: Path) -> None:
    config = _read(demo_dir / "config.json")
    generation = _read(demo_dir / "generation_config.json")
    tokenizer = Tokenizer.from_dir(demo_dir)
    assert config["vocab_size"] == tokenizer.vocab_size == 2048
    end_of_text = tokenizer.token_to_id("<|end_of_text|>")
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert config["eos_token_id"] == generation["eos_token_id"] == [end_of_text, im_end]
    assert config["bos_token_id"] == generation["bos_token_id"] == tokenizer.bos_token_id
    assert generation["do_sample"] is False
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>"
    tokenizer_config = _read(demo_dir / "tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"]
    declared = {int(k): v["content"] for k, v in tokenizer_config["added_tokens_decoder"].items()}
    assert set(declared) == tokenizer.special_token_ids
    for token_id, content in declared.items():
        assert tokenizer.token_to_id(content) == token_id


def test_model_card_loads(demo_dir: Path) -> None:
    card = ModelCard.load(demo_dir)
    assert card.max_model_len == 2048
    assert card.vocab_size == 2048
    assert card.architectures == ("LlamaForCausalLM",)
    assert len(card.eos_token_ids) == 2
    assert card.served_name == "demo-model"


def test_tokenizer_round_trips_multibyte_text(demo_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(demo_dir)
    text = "Hello, world! Café crème, 日本語 and 你好 😀🚀 ✅\n\tdef f(x): return x ** 2"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
    # Common words are single tokens: the BPE actually learned merges.
    assert len(tokenizer.encode(" the", add_special_tokens=False)) == 1


def test_chat_template_renders(demo_dir: Path) -> None:
    template = ChatTemplate.from_dir(demo_dir)
    assert template is not None
    prompt = template.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi 👋"}]},
        ]
    )
    assert prompt == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 👋<|im_end|>\n<|im_start|>assistant\n"
    )
    tokenizer = Tokenizer.from_dir(demo_dir)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id
    im_start = tokenizer.token_to_id("<|im_start|>")
    assert im_start is not None
    assert ids.count(im_start) == 3
