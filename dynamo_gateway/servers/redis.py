"""A real redis-server on 127.0.0.1, for the shared KV tier.

`RedisServer` runs Debian's ``redis-server`` on a free port with no
persistence (no RDB, no AOF), an optional ``maxmemory`` with LRU eviction (the
shared tier's capacity is the server's), logging to a file in the caller's
directory. It can be stopped, killed and started again on the same port: how
the tier's outage tests take the store away mid-run.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from dynamo_gateway.servers.ports import free_port
from dynamo_gateway.servers.process import ServerProcess

REDIS_BINARY_ENV = "DYNAMO_GATEWAY_REDIS_SERVER"  # overrides the binary found on PATH


def find_redis_server() -> str | None:
    """$DYNAMO_GATEWAY_REDIS_SERVER, ``redis-server`` on PATH, or Debian's /usr/bin one."""
    given = os.environ.get(REDIS_BINARY_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    path = "/usr/bin/redis-server"
    return path if os.access(path, os.X_OK) else None


class RedisServer(ServerProcess):
    """One redis-server process; the port is chosen once and kept across restarts."""

    program = "redis-server"
    poll_interval_s = 0.02

    def __init__(
        self,
        directory: Path,
        *,
        binary: str | None = None,
        name: str = "redis",
        maxmemory_mb: int | None = None,
    ) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError(
                "no redis-server binary (install redis-server or set $DYNAMO_GATEWAY_REDIS_SERVER)"
            )
        super().__init__(directory, binary=found, name=name)
        self.port = free_port()
        self.maxmemory_mb = maxmemory_mb

    @property
    def url(self) -> str:
        """The tier URL: ``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def _address(self) -> str:
        return self.url

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
        ]
        if self.maxmemory_mb:
            argv += ["--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "allkeys-lru"]
        return argv

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                sock.sendall(b"PING\r\n")
                return sock.recv(7) == b"+PONG\r\n"
        except OSError:
            return False

    def restart(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop (or kill) and start again on the same port (empty: nothing persists)."""
        self._halt(kill)
        self.start(timeout)
