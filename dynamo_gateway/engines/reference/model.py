"""The reference engine's transformer: Llama / Qwen2 / Mistral over a paged KV cache.

A plain-torch decoder written for low per-step overhead rather than for
training: weights are fused at load time (q/k/v into one matrix, gate/up into
another), the rotary cos/sin tables are precomputed up to
``max_position_embeddings``, attention is delegated to a swappable
`AttentionBackend` that plans once per step, and logits are computed only for
the rows the caller asks for. Numerics follow Hugging Face transformers (RMSNorm
in float32, rotate-half rotary embeddings computed in float32 and cast to the
model dtype), so that float32 logits match it to ~1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynamo_gateway.engines.reference.attention import AttentionBackend, make_backend
from dynamo_gateway.engines.reference.batch import ForwardBatch
from dynamo_gateway.engines.reference.config import ModelConfig
from dynamo_gateway.engines.reference.kv_cache import PagedKVCache
from dynamo_gateway.engines.reference.weights import load_weights
from dynamo_gateway.errors import ConfigError

__all__ = ["ReferenceModel", "resolve_device", "resolve_dtype", "rope_inv_freq"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("reference engine: device 'cuda' requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, *, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """``auto`` is float32 on CPU, and the checkpoint's dtype (default bfloat16) on CUDA."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(checkpoint_dtype or "", torch.bfloat16)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2] (float32), with the config's scaling."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        # Positions divided by the factor == frequencies divided by it.
        return inv_freq / factor
    # llama3: keep high frequencies (short wavelengths), divide low ones by the
    # factor, and blend linearly in between, by wavelength relative to the
    # original context.
    old_context = float(scaling["original_max_position_embeddings"])
    low_factor = float(scaling["low_freq_factor"])
    high_factor = float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low_factor, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_factor) / (high_factor - low_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high_factor) & (wavelen <= old_context / low_factor)
    return torch.where(medium, blended, scaled)


@dataclass
class _Layer:
    # Weights are stored transposed ([in, out], contiguous: the faster layout for
    # torch.mm at decode sizes), with the RMSNorm weight that precedes a projection
    # folded into its input rows (see _unit_rms).
    qkv: torch.Tensor  # [hidden, (heads + 2 * kv_heads) * head_dim]
    qkv_bias: torch.Tensor | None  # [(heads + 2 * kv_heads) * head_dim]
    o_proj: torch.Tensor  # [heads * head_dim, hidden]
    o_bias: torch.Tensor | None  # [hidden] (Llama with attention_bias only)
    gate_up: torch.Tensor  # [hidden, 2 * intermediate]
    down: torch.Tensor  # [intermediate, hidden]


class ReferenceModel:
    """A loaded model; `forward` runs one step of a `ForwardBatch` over a `PagedKVCache`."""

    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        attention: str = "gather-sdpa",
    ) -> None:
        """Build from HF-named tensors (any float dtype) already on `device` (see `load`).

        `tensors` is consumed: each entry is removed once converted, so that peak
        memory stays near one copy of the model rather than two.
        """
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.attention: AttentionBackend = make_backend(
            attention,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            sliding_window=config.sliding_window,
        )

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=self.device, dtype=dtype).contiguous()

        def linear(t: torch.Tensor) -> torch.Tensor:
            return cast(t.t())  # [out, in] -> [in, out]

        take = tensors.pop

        def fold(norm: str, names: list[str]) -> torch.Tensor:
            # RMSNorm(x) @ W.T == unit_rms(x) @ (W * (norm_w * sqrt(hidden))).T: one op
            # less per norm. Folded in float32, so a half-precision model is rounded once.
            scale = take(norm).float() * math.sqrt(config.hidden_size)
            fused = torch.cat([take(n).float() for n in names]) * scale
            return linear(fused)

        self.embed = cast(take("model.embed_tokens.weight"))  # [vocab, hidden]
        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}"
            attn = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
            bias = None
            if config.attention_bias:
                bias = cast(torch.cat([take(f"{n}.bias") for n in attn]))
            self.layers.append(
                _Layer(
                    qkv=fold(f"{p}.input_layernorm.weight", [f"{n}.weight" for n in attn]),
                    qkv_bias=bias,
                    o_proj=linear(take(f"{p}.self_attn.o_proj.weight")),
                    o_bias=cast(take(f"{p}.self_attn.o_proj.bias")) if config.o_proj_bias else None,
                    gate_up=fold(
                        f"{p}.post_attention_layernorm.weight",
                        [f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"],
                    ),
                    down=linear(take(f"{p}.mlp.down_proj.weight")),
                )
            )
        # The final norm stays separate: it runs on the logits rows only, and folding it
        # into a tied lm_head would need a second copy of the embedding.
        self.norm = cast(take("model.norm.weight").float() * math.sqrt(config.hidden_size))
        # [hidden, vocab]; a tied head is a transposed view (strided, but no second copy).
        if config.tie_word_embeddings:
            self.lm_head = self.embed.t()
        else:
            self.lm_head = linear(take("lm_head.weight"))

        # Rotary tables [max_pos, head_dim], computed in float32 like transformers.
        # `sin` carries rotate-half's sign: rotate_half(x) * sin == swap_halves(x) * sin_signed.
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))  # [max_pos, head_dim / 2]
        self.cos = cast(torch.cat([freqs.cos(), freqs.cos()], dim=-1))
        self.sin = cast(torch.cat([-freqs.sin(), freqs.sin()], dim=-1))
        # Values ride through the rotation unchanged (cos 1, sin 0), so that q, k and v
        # are rotated by one op and leave it as one tensor.
        self._v_cos = torch.ones((1, config.num_kv_heads, config.head_dim), dtype=dtype)
        self._v_cos = self._v_cos.to(self.device)
        self._v_sin = torch.zeros_like(self._v_cos)
        # A tensor, not a Python float: adding a float scalar costs a conversion op.
        self._eps = torch.full((1,), config.rms_norm_eps * config.hidden_size, device=self.device)
        self._float32 = dtype == torch.float32

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "gather-sdpa",
    ) -> ReferenceModel:
        """Load a model directory (config.json + safetensors) or GGUF file; else `ConfigError`."""
        config = ModelConfig.from_dir(path)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device=torch_device, checkpoint_dtype=config.torch_dtype)
        # Kept in the checkpoint's dtype until the norms are folded in (in float32).
        tensors = load_weights(path, config, dtype=None, device=torch_device)
        return cls(config, tensors, device=torch_device, dtype=torch_dtype, attention=attention)

    def new_cache(self, *, num_blocks: int, block_size: int) -> PagedKVCache:
        """A zeroed KV cache that fits this model (its layers, KV heads, dtype and device)."""
        return PagedKVCache.for_model(
            self.config,
            num_blocks=num_blocks,
            block_size=block_size,
            dtype=self.dtype,
            device=self.device,
        )

    def _unit_rms(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(hidden) / rms(x): RMSNorm without its weight and its sqrt(hidden).

        Both are folded into the weights that read the result (sqrt(hidden) too,
        so that ``mean`` becomes a cheaper ``sum``). Computed in float32, as in HF.
        """
        if self._float32:
            return x * (x * x).sum(-1, keepdim=True).add_(self._eps).rsqrt_()
        x32 = x.float()
        return (x32 * (x32 * x32).sum(-1, keepdim=True).add_(self._eps).rsqrt_()).to(x.dtype)

    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """One step: store the new tokens' K/V and return float32 logits [S', vocab].

        Row ``j`` of the result belongs to ``batch.logits_indices[j]``.
        """
        self._check(batch, cache)
        with torch.inference_mode():
            return self._forward(batch, cache)

    def _forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        n_tokens = batch.num_tokens
        hd = self.config.head_dim
        half = hd // 2
        q_heads = self.config.num_heads
        kv_heads = self.config.num_kv_heads
        inter = self.config.intermediate_size
        # Per-step rotary factors for every head of q, k and v: [T, heads + 2 * kv_heads, hd].
        rope_shape = (n_tokens, q_heads + kv_heads, hd)
        v_shape = (n_tokens, kv_heads, hd)
        cos = self.cos.index_select(0, batch.positions).unsqueeze(1).expand(rope_shape)
        sin = self.sin.index_select(0, batch.positions).unsqueeze(1).expand(rope_shape)
        cos = torch.cat([cos, self._v_cos.expand(v_shape)], dim=1)
        sin = torch.cat([sin, self._v_sin.expand(v_shape)], dim=1)
        attend = self.attention.begin(batch, cache)

        x = F.embedding(batch.token_ids, self.embed)  # [T, hidden], the residual stream
        for i, layer in enumerate(self.layers):
            h = self._unit_rms(x)
            if layer.qkv_bias is None:
                qkv = torch.mm(h, layer.qkv)  # [T, (heads + 2 * kv_heads) * hd]
            else:
                qkv = torch.addmm(layer.qkv_bias, h, layer.qkv)
            qkv = qkv.view(n_tokens, -1, hd)
            # Rotary (v passes unchanged). flip on [.., 2, hd/2] swaps the halves like
            # roll(hd/2) but in one kernel; sin carries rotate-half's sign.
            swapped = qkv.view(n_tokens, -1, 2, half).flip(2).view(n_tokens, -1, hd)
            qkv = torch.addcmul(qkv * cos, swapped, sin)
            kv = qkv[:, q_heads:].view(n_tokens, 2, kv_heads, hd)
            out = attend(i, qkv[:, :q_heads], kv)  # [T, heads * hd]
            # residual + o_proj(out), the add fused into the matmul
            x = torch.addmm(x if layer.o_bias is None else x + layer.o_bias, out, layer.o_proj)
            gate_up = torch.mm(self._unit_rms(x), layer.gate_up)  # [T, 2 * intermediate]
            x = torch.addmm(x, F.silu(gate_up[:, :inter]) * gate_up[:, inter:], layer.down)

        # Norms are per row: select the wanted rows first, then normalize only those.
        x = x.index_select(0, batch.logits_indices)  # [S', hidden]
        logits = torch.mm(self._unit_rms(x) * self.norm, self.lm_head)  # [S', vocab]
        return logits.float()

    def _check(self, batch: ForwardBatch, cache: PagedKVCache) -> None:
        if cache.dtype != self.dtype or cache.num_layers != self.config.num_layers:
            raise ValueError("KV cache was not made for this model (dtype or layer count)")
        if cache.num_kv_heads != self.config.num_kv_heads or cache.head_dim != self.config.head_dim:
            raise ValueError("KV cache was not made for this model (KV head shape)")
        longest = max(batch.context_lens)
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"context of {longest} tokens exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )

    def describe(self) -> dict[str, Any]:
        """A summary for logs: architecture, sizes, dtype, device and attention backend."""
        params = sum(int(t.numel()) for t in self._tensors())
        return {
            "architecture": self.config.architecture,
            "parameters": params,
            "layers": self.config.num_layers,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "attention": self.attention.name,
        }

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [self.embed, self.norm]
        if not self.config.tie_word_embeddings:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors += [layer.qkv, layer.o_proj, layer.gate_up, layer.down]
            tensors += [b for b in (layer.qkv_bias, layer.o_bias) if b is not None]
        return tensors
