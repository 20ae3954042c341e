"""dynamo-gateway-toy: the example engine plugin (docs/writing-an-engine-plugin.md)."""

__version__ = "0.1.0"
