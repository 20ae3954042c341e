"""Reading a checkpoint's safetensors shards into named, checked, cast tensors.

Tensors keep their Hugging Face names (``model.layers.3.self_attn.q_proj.weight``,
...); `expected_shapes` lists every one a `ModelConfig` needs, and
`load_weights` refuses a checkpoint that lacks one or has it in another shape,
naming them all, before any tensor is read. Names the model does not use (an old
``rotary_emb.inv_freq``, a tied ``lm_head.weight``) are ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from dynamo_gateway.engines.reference.config import ModelConfig
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.gguf import GgufModel, find_gguf

log = logging.getLogger(__name__)

__all__ = ["expected_shapes", "find_shards", "load_weights"]

_MAX_NAMES_IN_ERROR = 8
_INDEX_FILE = "model.safetensors.index.json"


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, by HF name, with its shape ([out, in] for linears)."""
    hidden = config.hidden_size
    q_dim = config.num_heads * config.head_dim
    kv_dim = config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
    }
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_dim, hidden)
        if config.attention_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (q_dim,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (kv_dim,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (kv_dim,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (hidden, q_dim)
        if config.o_proj_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def find_shards(path: str | Path) -> list[Path]:
    """The safetensors files of a model directory.

    With a ``model.safetensors.index.json``, exactly the shards it maps (a
    directory may also hold e.g. a ``consolidated.safetensors`` in another
    naming scheme); otherwise every ``*.safetensors`` file.
    """
    root = Path(path)
    index = root / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"cannot read {index}: {exc}") from None
        shards = [root / name for name in names]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise ConfigError(f"{index} names missing shard files: {', '.join(absent)}")
        return shards
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        raise ConfigError(f"no *.safetensors weights in model directory {root}")
    return shards


def load_weights(
    path: str | Path, config: ModelConfig, *, dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Load every tensor of `expected_shapes` from the shards onto `device`.

    Cast to `dtype`, or kept in the checkpoint's dtype if it is None.

    Raises `ConfigError` naming the missing and mis-shaped tensors (shapes are
    checked from the headers, before any data is read) or duplicated names.
    `path` may also be a GGUF file (or a directory holding only one): its
    tensors are dequantised to float32 first.
    """
    expected = expected_shapes(config)
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return _load_gguf(GgufModel.open(gguf_file), expected, config, dtype=dtype, device=device)
    located: dict[str, Path] = {}
    wrong: list[str] = []
    for shard in find_shards(path):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                if name not in expected:
                    continue
                if name in located:
                    raise ConfigError(
                        f"tensor {name} appears in both {located[name].name} and {shard.name}"
                    )
                located[name] = shard
                shape = tuple(int(d) for d in f.get_slice(name).get_shape())
                if shape != expected[name]:
                    wrong.append(f"{name} has shape {list(shape)}, expected {list(expected[name])}")
    _check_complete(expected, set(located), wrong, path, config)

    tensors: dict[str, torch.Tensor] = {}
    by_shard: dict[Path, list[str]] = {}
    for name, shard in located.items():
        by_shard.setdefault(shard, []).append(name)
    total = sum(_numel(expected[n]) for n in located)
    loaded = 0
    for i, (shard, names) in enumerate(by_shard.items(), 1):
        # Loading a real checkpoint takes a while: say how far it got.
        log.info(
            "loading %s (shard %d/%d, %.0f%% of %s parameters)",
            shard.name, i, len(by_shard), 100 * loaded / max(total, 1), f"{total:,}",
        )  # fmt: skip
        loaded += sum(_numel(expected[n]) for n in names)
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name in names:
                # Move first, then cast: on a GPU the cast runs there, not on the host.
                tensor = f.get_tensor(name).to(device=device)
                tensors[name] = tensor if dtype is None else tensor.to(dtype=dtype)
    return tensors


def _load_gguf(
    gguf: GgufModel,
    expected: dict[str, tuple[int, ...]],
    config: ModelConfig,
    *,
    dtype: torch.dtype | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    names = gguf.tensor_names()
    wrong = [
        f"{name} has shape {list(gguf.shape(name))}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in names and gguf.shape(name) != shape
    ]
    _check_complete(expected, set(names), wrong, gguf.path, config)
    log.info("dequantising %d tensors of %s", len(expected), gguf.path.name)
    tensors: dict[str, torch.Tensor] = {}
    for name in expected:
        tensor = torch.from_numpy(gguf.tensor(name)).to(device=device)
        tensors[name] = tensor if dtype is None else tensor.to(dtype=dtype)
    return tensors


def _check_complete(
    expected: dict[str, tuple[int, ...]],
    present: set[str],
    wrong: list[str],
    source: str | Path,
    config: ModelConfig,
) -> None:
    missing = [name for name in expected if name not in present]
    problems: list[str] = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_names(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped tensor(s): {_names(wrong)}")
    if problems:
        raise ConfigError(
            f"checkpoint in {source} does not match its {config.architecture} config: "
            + "; ".join(problems)
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES_IN_ERROR])
    more = len(items) - _MAX_NAMES_IN_ERROR
    return shown + (f" and {more} more" if more > 0 else "")
