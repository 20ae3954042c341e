"""The ``nixl`` KV-transport factory; NIXL is imported here, only when a transport is built."""

from __future__ import annotations

from types import ModuleType

from dynamo_gateway.errors import ConfigError
from dynamo_gateway.plugins import import_optional
from dynamo_gateway_nixl import __version__

INSTALL_HINT = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"


def import_nixl() -> ModuleType:
    """Import nixl, or raise `ConfigError` saying how to install it."""
    return import_optional("nixl", needed_by="the nixl KV transport", hint=INSTALL_HINT)


def build_transport(context: object) -> object:
    """Build one worker's NIXL transport (registered as ``nixl``).

    The KV-transport interface, and so the type of ``context``, lands with the
    disaggregated-serving subsystem.
    """
    import_nixl()
    raise ConfigError(
        f"the nixl KV transport integration is not implemented yet in dynamo-gateway-nixl "
        f"{__version__}; pick another KV transport for now (see `dynamo-gateway plugins`)"
    )
