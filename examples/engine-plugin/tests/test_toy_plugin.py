"""The plugin is installed, listed under its name, and cheap to list."""

from __future__ import annotations

import subprocess
import sys

from dynamo_gateway.plugins import load_plugins


def test_plugin_is_installed() -> None:
    plugins = load_plugins(only=["toy"])
    assert "toy" in [p.name for p in plugins.loaded]
    assert "toy" in plugins.registry.engines.names()


def test_left_out_when_not_selected() -> None:
    assert "toy" not in load_plugins(only=[]).registry.engines.names()


def test_listing_does_not_import_the_engine() -> None:
    code = (
        "import sys; from dynamo_gateway.plugins import load_plugins; load_plugins(only=['toy']);"
        "print('dynamo_gateway_toy.engine' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
