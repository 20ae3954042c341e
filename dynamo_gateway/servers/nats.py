"""A real nats-server on 127.0.0.1.

`NatsServer` runs the ``nats-server`` binary (Debian's nats-server) on a free
port, logging to a file in a directory of the caller's choosing. It can be
stopped, killed and started again on the *same* port, which is what the event
plane's reconnect tests need. No JetStream: the event plane is core NATS only.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from dynamo_gateway.servers.ports import free_port
from dynamo_gateway.servers.process import ServerProcess

NATS_BINARY_ENV = "DYNAMO_GATEWAY_NATS_SERVER"  # overrides the binary found on PATH


def find_nats_server() -> str | None:
    """The binary to run: $DYNAMO_GATEWAY_NATS_SERVER, ``nats-server`` on PATH, or
    /usr/sbin/nats-server (Debian installs it there, often not on a user's PATH)."""
    given = os.environ.get(NATS_BINARY_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which("nats-server")
    if found:
        return found
    for path in ("/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if os.access(path, os.X_OK):
            return path
    return None


class NatsServer(ServerProcess):
    """One nats-server process; the port is chosen once and kept across restarts."""

    program = "nats-server"
    ready_word = "ready"
    poll_interval_s = 0.02

    def __init__(self, directory: Path, *, binary: str | None = None, name: str = "nats") -> None:
        found = binary or find_nats_server()
        if found is None:
            raise FileNotFoundError(
                "no nats-server binary (install nats-server or set $DYNAMO_GATEWAY_NATS_SERVER)"
            )
        super().__init__(directory, binary=found, name=name)
        self.port = free_port()

    @property
    def url(self) -> str:
        """The event-plane URL: ``nats://127.0.0.1:<port>``."""
        return f"nats://{self.host}:{self.port}"

    @property
    def _address(self) -> str:
        return self.url

    def _argv(self) -> list[str]:
        return [
            self.binary,
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--server_name",
            self.name,
            "--log",
            str(self.log_path),
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Start nats-server and wait until a client connection gets its ``INFO`` line."""
        super().start(timeout)

    def _ready(self) -> bool:
        # The server greets every client with `INFO {...}\r\n` before anything else.
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                return sock.recv(5) == b"INFO "
        except OSError:
            return False

    def restart(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop (or kill) and start again on the same port."""
        self._halt(kill)
        self.start(timeout)
