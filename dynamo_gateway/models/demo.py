"""Build the offline demo model: a tiny random-weight Llama in Hugging Face format.

The gateway's tests, examples and benchmarks need a real model directory
(tokenizer, chat template, config, weights) without network access. This module
creates one in a few seconds, byte-for-byte identical on every run and machine:

* the tokenizer is a byte-level BPE trained on :mod:`dynamo_gateway.models.corpus`;
  BPE training in ``tokenizers`` breaks ties between equally frequent pairs by
  pair ids and sorts its alphabet, so the result does not depend on thread count
  or hash seeds (the tests build twice in separate processes to keep this true);
* weights come from ``numpy.random.default_rng`` seeded per tensor name, so
  adding or reordering tensors never changes the others;
* JSON files are written with sorted keys.

Run ``python -m dynamo_gateway.models.demo OUT_DIR`` to build one by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dynamo_gateway.models.corpus import DEFAULT_SEED, corpus_lines

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "END_OF_TEXT_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_demo_model",
    "main",
    "weight_shapes",
]

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Trainer special tokens get the first ids, in this order (0..4).
SPECIAL_TOKENS = (BOS_TOKEN, END_OF_TEXT_TOKEN, IM_START_TOKEN, EOS_TOKEN, PAD_TOKEN)

VOCAB_SIZE = 2048
MAX_POSITION_EMBEDDINGS = 2048
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 352
NUM_LAYERS = 4
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
INIT_STD = 0.02
WEIGHT_SEED = 1234

# ChatML with a leading BOS. Content may be a string, null, or a list of
# OpenAI-style content parts, whose text parts are joined by newlines (the same
# rule as dynamo_gateway.preprocess.chat_template.normalize_messages).
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "  {%- if message['content'] is string -%}\n"
    "    {%- set content = message['content'] -%}\n"
    "  {%- elif message['content'] is none -%}\n"
    "    {%- set content = '' -%}\n"
    "  {%- else -%}\n"
    "    {%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\\n') -%}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}\n"
)

_README = """\
# dynamo-gateway demo model

A **random-weight** Llama-architecture model built by
`dynamo_gateway.models.demo.build_demo_model` for tests, examples and benchmarks.
It produces meaningless text: use it to exercise the serving path, never for output quality.

* tokenizer: byte-level BPE, vocabulary {vocab} (including {n_special} special tokens),
  trained on a generated corpus; ChatML chat template
* model: {layers} layers, hidden {hidden}, {heads} attention heads ({kv_heads} KV heads),
  head dim {head_dim}, {params:,} parameters, float32
* built offline and deterministically: rebuilding gives identical files
"""


def build_demo_model(out_dir: Path, *, progress: bool = False) -> Path:
    """Write the demo model into ``out_dir`` (created if needed) and return it.

    Existing files of the same names are overwritten; other files are left alone.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def report(message: str) -> None:
        if progress:
            elapsed = time.perf_counter() - started
            print(f"[demo model {elapsed:5.2f}s] {message}", file=sys.stderr, flush=True)

    report(f"training byte-level BPE tokenizer (vocab {VOCAB_SIZE})")
    tokenizer = _train_tokenizer()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {token: _token_id(tokenizer, token) for token in SPECIAL_TOKENS}
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids))

    report("writing config.json and generation_config.json")
    eos_ids = [ids[END_OF_TEXT_TOKEN], ids[EOS_TOKEN]]
    _write_json(out / "config.json", _model_config(vocab_size, ids[BOS_TOKEN], eos_ids))
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": ids[BOS_TOKEN], "eos_token_id": eos_ids, "do_sample": False},
    )

    report("generating random weights")
    tensors = _weights(vocab_size)
    weights_file = out / "model.safetensors"
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    # safetensors creates the file owner-only; make it readable like the others.
    weights_file.chmod(0o644)
    params = sum(int(t.size) for t in tensors.values())
    (out / "README.md").write_text(
        _README.format(
            vocab=vocab_size,
            n_special=len(SPECIAL_TOKENS),
            layers=NUM_LAYERS,
            hidden=HIDDEN_SIZE,
            heads=NUM_HEADS,
            kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            params=params,
        ),
        encoding="utf-8",
    )
    report(f"done: {out} ({params:,} parameters)")
    return out


def _train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(DEFAULT_SEED), trainer)
    bos_id = _token_id(tokenizer, BOS_TOKEN)
    # encode(text, add_special_tokens=True) prepends BOS, like Llama 3.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:  # pragma: no cover - the trainer always adds them
        raise RuntimeError(f"special token {token!r} missing from the trained tokenizer")
    return int(token_id)


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    decoder = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, token_id in ids.items()
    }
    return {
        "added_tokens_decoder": decoder,
        "bos_token": BOS_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _model_config(vocab_size: int, bos_id: int, eos_ids: list[int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def weight_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names and shapes ([out_features, in_features])."""
    q_dim = NUM_HEADS * HEAD_DIM
    kv_dim = NUM_KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        prefix = f"model.layers.{i}"
        shapes[f"{prefix}.input_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q_dim, HIDDEN_SIZE)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_dim, HIDDEN_SIZE)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_dim, HIDDEN_SIZE)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (HIDDEN_SIZE, q_dim)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (HIDDEN_SIZE, INTERMEDIATE_SIZE)
    shapes["model.norm.weight"] = (HIDDEN_SIZE,)
    shapes["lm_head.weight"] = (vocab_size, HIDDEN_SIZE)
    return shapes


def _weights(vocab_size: int) -> dict[str, np.ndarray[Any, np.dtype[np.float32]]]:
    tensors: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
    for name, shape in weight_shapes(vocab_size).items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, dtype=np.float32)
            continue
        # A generator per tensor, seeded by its name: independent of build order.
        rng = np.random.default_rng([WEIGHT_SEED, zlib.crc32(name.encode("utf-8"))])
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(INIT_STD)
        tensors[name] = values
    return tensors


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m dynamo_gateway.models.demo OUT_DIR [--quiet]``."""
    parser = argparse.ArgumentParser(description="Build the random-weight demo model.")
    parser.add_argument("out_dir", type=Path, help="directory to write the model into")
    parser.add_argument("--quiet", action="store_true", help="do not print progress")
    args = parser.parse_args(argv)
    path = build_demo_model(args.out_dir, progress=not args.quiet)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
