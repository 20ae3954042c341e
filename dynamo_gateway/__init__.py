"""dynamo-gateway: an engine-agnostic, distributed LLM inference-serving gateway."""

from __future__ import annotations

from dynamo_gateway.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
