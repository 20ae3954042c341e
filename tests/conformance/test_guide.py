"""docs/writing-an-engine-plugin.md stays true to the code it describes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dynamo_gateway import hookspecs
from dynamo_gateway.testing.conformance import Capabilities, EngineSpec

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "writing-an-engine-plugin.md").read_text(encoding="utf-8")


def test_the_engine_hook_is_shown_with_its_signature() -> None:
    assert callable(hookspecs.dynamo_gateway_register_engines)
    assert "def dynamo_gateway_register_engines(register: EngineRegister) -> None" in GUIDE


def test_every_capability_and_spec_field_is_named() -> None:
    for f in dataclasses.fields(Capabilities):
        assert f"`{f.name}`" in GUIDE or f"{f.name}=" in GUIDE, f.name
    for name in ("engine", "factory", "model", "settings", "capabilities", "eos_prompt"):
        assert name in {f.name for f in dataclasses.fields(EngineSpec)}
        assert name in GUIDE


def test_the_example_it_points_to_exists() -> None:
    example = ROOT / "examples" / "engine-plugin"
    assert 'toy = "dynamo_gateway_toy.plugin"' in (example / "pyproject.toml").read_text()
    for part in ("dynamo_gateway_toy/plugin.py", "tests/test_toy_conformance.py"):
        assert (example / part).is_file()
    for linked in ("plugins.md", "disaggregation.md"):
        assert (ROOT / "docs" / linked).is_file()
    assert "writing-an-engine-plugin.md" in (ROOT / "docs" / "plugins.md").read_text()
    assert "writing-an-engine-plugin.md" in (ROOT / "README.md").read_text()
