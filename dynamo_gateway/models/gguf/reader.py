"""One GGUF file seen as a Hugging Face model: config, tokenizer, template, tensors.

`GgufModel.open(path)` memory-maps the file (the ``gguf`` package's reader) and
answers what a model directory's files would: `config` (a ``config.json``
dict), `generation_config`, `tokenizer_config` (special tokens and the chat
template), `tokenizer_json` and, tensor by tensor, the weights under their HF
names, dequantised to float32 with llama.cpp's Q/K row order undone. Nothing
from transformers is used.

Supported architectures: ``llama`` (Llama, Mistral, SmolLM) and ``qwen2``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.gguf.dequant import dequantize, unpermute_qk
from dynamo_gateway.models.gguf.tokenizer import tokenizer_json

__all__ = ["GgufModel", "find_gguf"]

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor name -> HF name; "{i}" is the layer index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: itself, or the one ``*.gguf`` of a directory.

    A directory with a ``config.json`` is a Hugging Face directory even if it
    also holds a GGUF file (``models pull`` writes both); None then, and for a
    directory without GGUF files. Several GGUF files and no config.json is a
    `ConfigError` (which one?).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    if not p.is_dir() or (p / "config.json").is_file():
        return None
    files = sorted(p.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ConfigError(f"{p} holds several GGUF files ({names}); pass one file as --model")
    return files[0] if files else None


@dataclass(frozen=True)
class _Tensor:
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: innermost dimension last
    data: npt.NDArray[np.generic]


class GgufModel:
    """A parsed GGUF file (see the module docstring). Build with `open`."""

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, _Tensor]) -> None:
        self.path = path
        self.metadata = metadata
        self._tensors = tensors
        self.arch = str(metadata.get("general.architecture"))
        if self.arch not in _ARCHITECTURES:
            raise ConfigError(
                f"{path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {', '.join(sorted(_ARCHITECTURES))})"
            )

    @classmethod
    def open(cls, path: str | Path) -> GgufModel:
        """Parse `path` (cached per path and modification time); `ConfigError` if unreadable."""
        p = Path(path).expanduser().resolve()
        try:
            stamp = p.stat().st_mtime_ns
        except OSError as exc:
            raise ConfigError(f"cannot read GGUF file {path}: {exc}") from None
        return _open_cached(p, stamp)

    # -- what a model directory would hold -----------------------------------------

    def _arch_key(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    def config(self) -> dict[str, Any]:
        """The ``config.json`` this checkpoint would have (float32 weights)."""
        try:
            hidden = int(self._arch_key("embedding_length"))
            heads = int(self._arch_key("attention.head_count"))
            layers = int(self._arch_key("block_count"))
            inter = int(self._arch_key("feed_forward_length"))
        except TypeError:
            raise ConfigError(f"{self.path}: GGUF metadata lacks the model's shapes") from None
        kv_heads = int(self._arch_key("attention.head_count_kv") or heads)
        vocab = self._arch_key("vocab_size") or len(self.metadata["tokenizer.ggml.tokens"])
        config: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": int(self._arch_key("attention.key_length") or hidden // heads),
            "hidden_act": "silu",
            "max_position_embeddings": int(self._arch_key("context_length", 2048)),
            "rms_norm_eps": float(self._arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._arch_key("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "torch_dtype": "float32",
        }
        if "rope_freqs.weight" in self._tensors:
            # Llama 3.1's per-frequency factors: config.json has the formula, GGUF only the table.
            raise ConfigError(f"{self.path}: GGUF rope frequency factors are not supported")
        scaling = self._arch_key("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise ConfigError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
            config["rope_scaling"] = {
                "rope_type": "linear",
                "factor": float(self._arch_key("rope.scaling.factor")),
            }
        for key in ("bos", "eos", "padding"):
            token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None:
                name = "pad_token_id" if key == "padding" else f"{key}_token_id"
                config[name] = int(token_id)
        return config

    def generation_config(self) -> dict[str, Any]:
        """``generation_config.json``: BOS and EOS ids (EOS plus an end-of-turn id if any)."""
        config = self.config()
        gen: dict[str, Any] = {
            k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config
        }
        eot = self.metadata.get("tokenizer.ggml.eot_token_id")
        if eot is not None and "eos_token_id" in gen and int(eot) != gen["eos_token_id"]:
            gen["eos_token_id"] = [gen["eos_token_id"], int(eot)]
        return gen

    def tokenizer_config(self) -> dict[str, Any]:
        """``tokenizer_config.json``: special tokens and the chat template."""
        tokens = self.metadata["tokenizer.ggml.tokens"]
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key in ("bos", "eos", "unknown", "padding"):
            token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None and 0 <= int(token_id) < len(tokens):
                name = {"unknown": "unk", "padding": "pad"}.get(key, key)
                config[f"{name}_token"] = tokens[int(token_id)]
        config["add_bos_token"] = bool(self.metadata.get("tokenizer.ggml.add_bos_token", False))
        config["clean_up_tokenization_spaces"] = False
        config["model_max_length"] = int(self._arch_key("context_length", 2048))
        template = self.metadata.get("tokenizer.chat_template")
        if isinstance(template, str):
            config["chat_template"] = template
        return config

    def tokenizer_json(self) -> str:
        """``tokenizer.json``, rebuilt from the vocabulary and merges."""
        try:
            return tokenizer_json(self.metadata)
        except KeyError as exc:
            raise ConfigError(f"{self.path}: GGUF tokenizer lacks {exc.args[0]}") from None

    # -- weights -------------------------------------------------------------------

    def tensor_names(self) -> dict[str, str]:
        """HF name -> GGUF name, for every tensor the model reads."""
        names: dict[str, str] = {}
        for gguf_name in self._tensors:
            hf = _hf_name(gguf_name)
            if hf is not None:
                names[hf] = gguf_name
        return names

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return self._tensors[self.tensor_names()[hf_name]].shape

    def tensor(self, hf_name: str) -> npt.NDArray[np.float32]:
        """One tensor by HF name, as float32 in HF's layout."""
        gguf_name = self.tensor_names()[hf_name]
        t = self._tensors[gguf_name]
        values = dequantize(t.data, t.ggml_type, t.shape)
        if ".self_attn.q_proj." in hf_name:
            values = unpermute_qk(values, int(self._arch_key("attention.head_count")))
        elif ".self_attn.k_proj." in hf_name:
            heads = self._arch_key("attention.head_count_kv") or self._arch_key(
                "attention.head_count"
            )
            values = unpermute_qk(values, int(heads))
        return values

    def tensors(self) -> Iterator[tuple[str, npt.NDArray[np.float32]]]:
        """Every tensor as ``(hf_name, float32 array)``, one at a time."""
        for hf_name in self.tensor_names():
            yield hf_name, self.tensor(hf_name)

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each GGML type id the file holds (for logs)."""
        counts: dict[str, int] = {}
        for t in self._tensors.values():
            key = str(t.ggml_type)
            counts[key] = counts.get(key, 0) + 1
        return counts


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None  # e.g. rope_freqs.weight: recomputed from the config


@functools.lru_cache(maxsize=4)
def _open_cached(path: Path, stamp: int) -> GgufModel:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read GGUF file {path}: {exc}") from None
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError, TypeError):
            continue
    tensors = {
        t.name: _Tensor(
            ggml_type=int(t.tensor_type),
            # GGUF lists dimensions innermost first.
            shape=tuple(int(d) for d in reversed(t.shape.tolist())),
            data=t.data,
        )
        for t in reader.tensors
    }
    return GgufModel(path, metadata, tensors)
