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
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

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


class EtcdServer:
    """One etcd process; ports are chosen once and kept across restarts."""

    def __init__(self, directory: Path, *, binary: str | None = None, name: str = "etcd") -> None:
        # Imported here: dynamo_gateway.testing imports this module for its fixture.
        from dynamo_gateway.testing import free_port

        found = binary or find_etcd()
        if found is None:
            raise FileNotFoundError(
                f"no etcd binary (install etcd-server or set ${ETCD_BINARY_ENV})"
            )
        self.binary = found
        self.name = name
        self.directory = Path(directory)
        self.data_dir = self.directory / f"{name}.data"
        self.log_path = self.directory / f"{name}.log"
        self.host = "127.0.0.1"
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The discovery URL: ``etcd://127.0.0.1:<client port>``."""
        return f"etcd://{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

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
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is for us, not etcd
            )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self._process.returncode} while starting\n"
                    f"--- {self.log_path} ---\n{self.log()[-4000:]}"
                )
            if self._healthy():
                return
            time.sleep(0.05)
        raise TimeoutError(
            f"etcd on {self.client_url} not healthy after {timeout} s\n"
            f"--- {self.log_path} ---\n{self.log()[-4000:]}"
        )

    def _healthy(self) -> bool:
        # A TCP probe first: cheaper than an HTTP request while etcd is not listening yet.
        try:
            with socket.create_connection((self.host, self.client_port), timeout=0.5):
                pass
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1.0) as resp:
                body = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return isinstance(body, dict) and body.get("health") == "true"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout`)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL and reap: etcd gets no chance to say goodbye to its clients."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None

    def restart(self, wipe: bool = False, *, kill: bool = False, timeout: float = 20.0) -> None:
        """Stop (or kill) and start again on the same ports; ``wipe`` drops all data."""
        if kill:
            self.kill()
        else:
            self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start(timeout)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
