"""The ``nixl`` KV-transport factory; NIXL is imported here, only when a transport is built."""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

from dynamo_gateway.plugins import import_optional

if TYPE_CHECKING:
    from dynamo_gateway.disagg.transport import TransportContext
    from dynamo_gateway_nixl.transport import NixlTransport

INSTALL_HINT = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"


def _route_nixl_logging() -> None:
    """Send NIXL's Python log records through the host's logging, not to stdout.

    Importing nixl configures its ``nixl`` logger with a handler of its own on
    *stdout*, not propagating, at INFO. Here it propagates to the root logger
    instead, at the root's level unless ``NIXL_LOG_LEVEL`` asks for one.
    """
    logger = logging.getLogger("nixl")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream in (
            sys.stdout,
            sys.__stdout__,
        ):
            logger.removeHandler(handler)
    logger.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logger.setLevel(logging.NOTSET)


def import_nixl() -> ModuleType:
    """Import nixl, or raise `ConfigError` saying how to install it."""
    raise_exceptions = logging.raiseExceptions  # nixl's import resets it process-wide
    try:
        module = import_optional("nixl", needed_by="the nixl KV transport", hint=INSTALL_HINT)
    finally:
        logging.raiseExceptions = raise_exceptions
    _route_nixl_logging()
    return module


def build_transport(context: TransportContext) -> NixlTransport:
    """Build one worker's NIXL transport (registered as ``nixl``).

    Imports NIXL (raising `ConfigError` with the install command when it is
    missing); the agent itself starts in `NixlTransport.start`.
    """
    nixl = import_nixl()
    from dynamo_gateway_nixl.transport import NixlTransport

    return NixlTransport(context, nixl)
