"""The reference engine's view of a Hugging Face ``config.json``.

Only decoder-only Llama-family checkpoints are supported: Llama (1-3.x),
Qwen2 / Qwen2.5 and Mistral. They share one layer layout (pre-norm RMSNorm,
rotary attention with grouped KV heads, SwiGLU MLP) and differ in a few knobs
this dataclass captures: q/k/v biases, tied embeddings, rope scaling and
Mistral's sliding window. Everything else (other activations, MLP biases,
partial rotary, yarn/longrope/dynamic rope) is refused with a `ConfigError`
rather than served wrong.

Both config dialects are read: the classic one (``rope_theta`` and
``rope_scaling`` at the top level, ``torch_dtype``) and the transformers-5 one
(``rope_parameters`` holding the theta and the scaling, ``dtype``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.gguf import GgufModel, find_gguf

__all__ = ["SUPPORTED_ARCHITECTURES", "SUPPORTED_ROPE_TYPES", "ModelConfig"]

# model_type -> HF class name, both accepted when detecting the architecture.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Keys of a rope-parameters dict that describe the base rotation, not a scaling.
_ROPE_BASE_KEYS = {"rope_theta", "rope_type", "type"}


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and knobs of a supported checkpoint (see the module docstring)."""

    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # normalized: always has "rope_type"; None = plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (Qwen2: True)
    torch_dtype: str | None  # the checkpoint's dtype name, e.g. "bfloat16"
    # Mistral: a query sees only the last `sliding_window` keys (itself included).
    sliding_window: int | None = None

    @property
    def o_proj_bias(self) -> bool:
        """Llama's ``attention_bias`` also gives o_proj a bias; Qwen2's q/k/v biases do not."""
        return self.attention_bias and self.architecture == "llama"

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` of a model directory; `ConfigError` if unsupported.

        A GGUF file (or a directory holding only one) gives its config from metadata.
        """
        gguf_file = find_gguf(path)
        if gguf_file is not None:
            return cls.from_dict(GgufModel.open(gguf_file).config(), source=str(gguf_file))
        config_path = Path(path) / "config.json"
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json in model directory {path}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {config_path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{config_path} is not a JSON object")
        return cls.from_dict(raw, source=str(config_path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Build from a parsed ``config.json`` (`source` names it in error messages)."""
        arch = _architecture(raw, source)
        try:
            hidden = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
            head_dim = int(raw.get("head_dim") or hidden // num_heads)
            config = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(raw),
                rope_scaling=_rope_scaling(raw, source),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=_attention_bias(raw, arch),
                torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
                sliding_window=_sliding_window(raw, arch, source),
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: missing required key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed value: {exc}") from None
        _check_supported(raw, config, source)
        return config


def _architecture(raw: dict[str, Any], source: str) -> str:
    model_type = raw.get("model_type")
    if model_type in SUPPORTED_ARCHITECTURES:
        return str(model_type)
    by_class = {cls_name: name for name, cls_name in SUPPORTED_ARCHITECTURES.items()}
    for cls_name in raw.get("architectures") or []:
        if cls_name in by_class:
            return by_class[cls_name]
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    raise ConfigError(
        f"{source}: unsupported architecture (model_type={model_type!r}, "
        f"architectures={raw.get('architectures')!r}); the reference engine supports {supported}"
    )


def _attention_bias(raw: dict[str, Any], arch: str) -> bool:
    # Qwen2 always has q/k/v biases and no config key for them; Mistral never has any.
    if arch == "qwen2":
        return True
    return arch == "llama" and bool(raw.get("attention_bias", False))


def _rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """The rope dict of either dialect: transformers-5 ``rope_parameters`` or ``rope_scaling``."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        return params
    scaling = raw.get("rope_scaling")
    return scaling if isinstance(scaling, dict) else {}


def _rope_theta(raw: dict[str, Any]) -> float:
    params = _rope_parameters(raw)
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _rope_scaling(raw: dict[str, Any], source: str) -> dict[str, Any] | None:
    params = _rope_parameters(raw)
    # Old checkpoints spell it "type"; "default" means no scaling at all.
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: unsupported rope scaling {rope_type!r}; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError(f"{source}: partial rotary embeddings are not supported")
    if rope_type == "default":
        return None
    scaling = {k: v for k, v in params.items() if k not in _ROPE_BASE_KEYS}
    scaling["rope_type"] = rope_type
    required = ["factor"]
    if rope_type == "llama3":
        required += ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
    missing = [key for key in required if key not in scaling]
    if missing:
        raise ConfigError(f"{source}: {rope_type} rope scaling lacks {', '.join(missing)}")
    return scaling


def _sliding_window(raw: dict[str, Any], arch: str, source: str) -> int | None:
    if arch == "qwen2":
        # Qwen2 windows only some layers (max_window_layers); not supported.
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 sliding-window attention is not supported")
        return None
    if arch != "mistral":
        return None
    window = raw.get("sliding_window")
    if window is None:
        return None
    window = int(window)
    # A window at least as long as the context never hides anything.
    if window >= int(raw.get("max_position_embeddings", 2048)):
        return None
    return window


def _check_supported(raw: dict[str, Any], config: ModelConfig, source: str) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise ConfigError(f"{source}: MLP biases (mlp_bias=true) are not supported")
    if config.num_heads % config.num_kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads ({config.num_heads}) is not a multiple of "
            f"num_key_value_heads ({config.num_kv_heads})"
        )
    if config.head_dim % 2:
        raise ConfigError(f"{source}: head_dim {config.head_dim} must be even for rotary")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and config.architecture != "mistral":
        odd = sorted({t for t in layer_types if t != "full_attention"})
        if odd:
            raise ConfigError(f"{source}: layer types {odd} are not supported")
