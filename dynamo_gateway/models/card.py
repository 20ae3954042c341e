"""What a worker serves: a model directory read into a small, plain description."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.gguf import GgufModel, find_gguf


@dataclass(frozen=True)
class ModelCard:
    """A local Hugging Face-style model directory (or GGUF file), as the gateway needs it.

    Reads config.json (context length, vocabulary) and generation_config.json
    (EOS ids), or their equivalents in a GGUF file's metadata. Weights are the
    engine's business.
    """

    path: Path
    served_name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    architectures: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def load(
        cls, path: str | Path, *, served_name: str | None = None, max_model_len: int | None = None
    ) -> ModelCard:
        root = Path(path).expanduser().resolve()
        gguf_file = find_gguf(root)
        if gguf_file is not None:
            gguf = GgufModel.open(gguf_file)
            config, gen = gguf.config(), gguf.generation_config()
        elif root.is_dir():
            config = _read_json(root / "config.json", required=True)
            gen = _read_json(root / "generation_config.json", required=False)
        elif not root.exists():
            raise ConfigError(f"model {str(path)!r} does not exist")
        else:
            raise ConfigError(f"model {str(path)!r} is neither a model directory nor a .gguf file")
        context = max_model_len or int(
            config.get("max_position_embeddings") or config.get("max_seq_len") or 4096
        )
        eos: Any = gen.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            path=root,
            served_name=served_name or (root.stem if root.suffix == ".gguf" else root.name),
            max_model_len=context,
            vocab_size=int(config.get("vocab_size", 0)),
            eos_token_ids=eos_ids,
            architectures=tuple(config.get("architectures") or ()),
            config=config,
        )


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ConfigError(f"{path} is missing: is this a Hugging Face model directory?")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data
