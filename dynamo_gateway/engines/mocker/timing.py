"""How long a simulated engine step takes: the mocker's timing model.

Pure arithmetic over `MockerSettings` (see its docstring for the formula). A
step that prefills pays the prefill terms once, a step that decodes pays the
decode terms once; a mixed step pays both, like a chunked-prefill batch does.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamo_gateway.settings import MockerSettings

__all__ = ["TimingModel"]


@dataclass(frozen=True, slots=True)
class TimingModel:
    speedup: float = 1.0
    # Dynamo 1.6.1's mocker; see `MockerSettings`.
    prefill_base_ms: float = 16.50142
    prefill_ms_per_token: float = 1.518344e-2
    prefill_ms_per_token2: float = 4.209989e-7
    decode_base_ms: float = 5.74
    decode_ms_per_kv_block: float = 8.24e-4

    @classmethod
    def from_settings(cls, settings: MockerSettings) -> TimingModel:
        return cls(
            speedup=settings.speedup,
            prefill_base_ms=settings.prefill_base_ms,
            prefill_ms_per_token=settings.prefill_ms_per_token,
            prefill_ms_per_token2=settings.prefill_ms_per_token2,
            decode_base_ms=settings.decode_base_ms,
            decode_ms_per_kv_block=settings.decode_ms_per_kv_block,
        )

    def step_ms(self, prefill_tokens: int, decode_kv_blocks: int) -> float:
        """Unscaled step time in ms.

        `decode_kv_blocks` is the number of KV blocks held by the step's decoding
        sequences; every decoding sequence holds at least one block, so 0 means
        the step does not decode.
        """
        ms = 0.0
        if prefill_tokens > 0:
            ms += (
                self.prefill_base_ms
                + self.prefill_ms_per_token * prefill_tokens
                + self.prefill_ms_per_token2 * prefill_tokens * prefill_tokens
            )
        if decode_kv_blocks > 0:
            ms += self.decode_base_ms + self.decode_ms_per_kv_block * decode_kv_blocks
        return ms

    def step_seconds(self, prefill_tokens: int, decode_kv_blocks: int) -> float:
        """Wall-clock seconds to simulate the step: `step_ms` divided by `speedup`."""
        return self.step_ms(prefill_tokens, decode_kv_blocks) / (1000.0 * self.speedup)
