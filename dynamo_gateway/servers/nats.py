"""A real nats-server on 127.0.0.1.

`NatsServer` runs the ``nats-server`` binary (Debian's nats-server) on a free
port, logging to a file in a directory of the caller's choosing. It can be
stopped, killed and started again on the *same* port, which is what the event
plane's reconnect tests need. No JetStream: the event plane is core NATS only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

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


class NatsServer:
    """One nats-server process; the port is chosen once and kept across restarts."""

    def __init__(self, directory: Path, *, binary: str | None = None, name: str = "nats") -> None:
        # Imported here: dynamo_gateway.testing imports this module for its fixture.
        from dynamo_gateway.testing import free_port

        found = binary or find_nats_server()
        if found is None:
            raise FileNotFoundError(
                "no nats-server binary (install nats-server or set $DYNAMO_GATEWAY_NATS_SERVER)"
            )
        self.binary = found
        self.name = name
        self.directory = Path(directory)
        self.log_path = self.directory / f"{name}.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The event-plane URL: ``nats://127.0.0.1:<port>``."""
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

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
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is for us, not the server
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self._process.returncode} while starting\n"
                    f"--- {self.log_path} ---\n{self.log()[-4000:]}"
                )
            if self._answers():
                return
            time.sleep(0.02)
        raise TimeoutError(
            f"nats-server on {self.url} not ready after {timeout} s\n"
            f"--- {self.log_path} ---\n{self.log()[-4000:]}"
        )

    def _answers(self) -> bool:
        # The server greets every client with `INFO {...}\r\n` before anything else.
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                return sock.recv(5) == b"INFO "
        except OSError:
            return False

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
        """SIGKILL and reap: the server gets no chance to say goodbye to its clients."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._process = None

    def restart(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop (or kill) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start(timeout)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
