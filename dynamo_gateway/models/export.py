"""Writing a GGUF checkpoint out as a normal Hugging Face model directory.

The directory holds what transformers and vLLM load (config.json,
generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja, model.safetensors) next to the GGUF file it came from.
It is written to a temporary sibling and renamed into place, so an interrupted
export never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.gguf import GgufModel

__all__ = ["export_gguf"]

_DTYPES = {"float32": np.float32, "float16": np.float16}


def export_gguf(
    gguf_file: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write `gguf_file` as a HF directory at `out_dir` (replacing one there); return it.

    `dtype` is the safetensors dtype (float32 keeps the dequantised values
    exactly); `progress(tensor_name, done, total)` is called per tensor.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    from safetensors.numpy import save_file

    gguf = GgufModel.open(gguf_file)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = gguf.config() | {"torch_dtype": dtype}
    _write_json(tmp / "config.json", config)
    _write_json(tmp / "generation_config.json", gguf.generation_config())
    tokenizer_config = gguf.tokenizer_config()
    template = tokenizer_config.pop("chat_template", None)
    _write_json(tmp / "tokenizer_config.json", tokenizer_config)
    (tmp / "tokenizer.json").write_text(gguf.tokenizer_json(), encoding="utf-8")
    if isinstance(template, str):
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")

    names = list(gguf.tensor_names())
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for done, name in enumerate(names, 1):
        tensors[name] = np.ascontiguousarray(gguf.tensor(name), dtype=_DTYPES[dtype])
        if progress is not None:
            progress(name, done, len(names))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(gguf_file, tmp / gguf_file.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
