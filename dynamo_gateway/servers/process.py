"""What `EtcdServer` and `NatsServer` share: one server process on 127.0.0.1.

`ServerProcess` starts ``_argv()`` in a session of its own with its output
appended to ``<directory>/<name>.log``, polls ``_ready()`` until the server
answers, and stops (SIGTERM), kills (SIGKILL) and restarts it. Subclasses
choose the ports once, so a restart comes back on the same ones.
"""

from __future__ import annotations

import signal
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Self


class ServerProcess(ABC):
    """One server process; see the module docstring."""

    program = "server"
    """The program's name in error messages."""
    ready_word = "ready"
    """What the server is not after a start times out (``... not <ready_word> after``)."""
    poll_interval_s = 0.05
    """How often `start` asks `_ready()` while it waits."""

    def __init__(self, directory: Path, *, binary: str, name: str) -> None:
        self.binary = binary
        self.name = name
        self.directory = Path(directory)
        self.log_path = self.directory / f"{name}.log"
        self.host = "127.0.0.1"
        self._process: subprocess.Popen[bytes] | None = None

    @abstractmethod
    def _argv(self) -> list[str]:
        """The command line that runs the server."""

    @abstractmethod
    def _ready(self) -> bool:
        """Whether the server answers (called while starting; must not block for long)."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The URL clients are given (``etcd://...``, ``nats://...``)."""

    @property
    @abstractmethod
    def _address(self) -> str:
        """Where the server listens, for error messages."""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (unless it runs) and wait until `_ready()`; kill it on failure."""
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
                    f"{self.program} exited with {self._process.returncode} while starting\n"
                    f"--- {self.log_path} ---\n{self.log()[-4000:]}"
                )
            if self._ready():
                return
            time.sleep(self.poll_interval_s)
        raise TimeoutError(
            f"{self.program} on {self._address} not {self.ready_word} after {timeout} s\n"
            f"--- {self.log_path} ---\n{self.log()[-4000:]}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL after `timeout`)."""
        if self._process is not None:
            terminate(self._process, timeout)
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

    def _halt(self, kill: bool) -> None:
        """`kill()` or `stop()`: the first half of a restart."""
        if kill:
            self.kill()
        else:
            self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM (after SIGCONT, in case it was frozen), wait, SIGKILL after `timeout`;
    the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)
