"""A real single-member etcd on 127.0.0.1.

`EtcdServer` runs the ``etcd`` binary (Debian's etcd-server) on free client and
peer ports with its data directory under a directory of the caller's choosing.
It can be stopped, killed and started again on the *same* ports, with or
without its data, which is what the discovery restart tests need.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

from dynamo_gateway.servers.ports import free_port
from dynamo_gateway.servers.process import ServerProcess

ETCD_BINARY_ENV = "DYNAMO_GATEWAY_ETCD"  # overrides the binary found on PATH


def find_etcd() -> str | None:
    """The etcd binary to run: $DYNAMO_GATEWAY_ETCD, ``etcd`` on PATH, or /usr/bin/etcd."""
    given = os.environ.get(ETCD_BINARY_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which("etcd")
    if found:
        return found
    return "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None


class EtcdServer(ServerProcess):
    """One etcd process; ports are chosen once and kept across restarts."""

    program = "etcd"
    ready_word = "healthy"
    poll_interval_s = 0.05

    def __init__(self, directory: Path, *, binary: str | None = None, name: str = "etcd") -> None:
        found = binary or find_etcd()
        if found is None:
            raise FileNotFoundError(
                f"no etcd binary (install etcd-server or set ${ETCD_BINARY_ENV})"
            )
        super().__init__(directory, binary=found, name=name)
        self.data_dir = self.directory / f"{name}.data"
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()

    @property
    def url(self) -> str:
        """The discovery URL: ``etcd://127.0.0.1:<client port>``."""
        return f"etcd://{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def _address(self) -> str:
        return self.client_url

    def _argv(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"{self.name}={peer}",
            "--initial-cluster-state",
            "new",
            # A single member: short raft timers make (re)starts elect at once.
            "--heartbeat-interval",
            "20",
            "--election-timeout",
            "200",
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ]

    def start(self, timeout: float = 20.0) -> None:
        """Start etcd and wait until ``/health`` answers ``{"health": "true"}``."""
        super().start(timeout)

    def _ready(self) -> bool:
        # A TCP probe first: cheaper than an HTTP request while etcd is not listening yet.
        try:
            with socket.create_connection((self.host, self.client_port), timeout=0.5):
                pass
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1.0) as resp:
                body = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def kill(self) -> None:
        """SIGKILL and reap: etcd gets no chance to say goodbye to its clients."""
        super().kill()

    def restart(self, wipe: bool = False, *, kill: bool = False, timeout: float = 20.0) -> None:
        """Stop (or kill) and start again on the same ports; ``wipe`` drops all data."""
        self._halt(kill)
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start(timeout)
