"""Fixtures that run real cairnd processes on Unix sockets and loopback TCP.

Each daemon gets its own temporary directory (socket, disk tier) and its own
memory tier under /dev/shm, both removed when it stops. The binary comes from
CAIRND_BIN, else the workspace's target/debug/cairnd.

A :class:`Daemon` can also be SIGKILLed and started again on the same
directories (``kill``/``start``/``restart``), and stopped and resumed with
SIGSTOP/SIGCONT (``pause``/``resume``), as a crashed or hung node agent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import cairn

REPO = Path(__file__).resolve().parents[2]


def cairnd_binary() -> str:
    path = os.environ.get("CAIRND_BIN") or str(REPO / "target" / "debug" / "cairnd")
    if not os.access(path, os.X_OK):
        pytest.fail(f"cairnd not found at {path}: build it (cargo build) or set CAIRND_BIN")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """One cairnd process; ``stop()`` is idempotent."""

    def __init__(
        self,
        *,
        tcp: bool = False,
        tenant: str | None = None,
        memory_capacity: int | None = None,
        config: str | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cairn-test-"))
        self.socket = str(self.dir / "cairn.sock")
        self.memory_dir = f"/dev/shm/cairn-test-{uuid.uuid4().hex[:12]}"
        self.tcp_addr = f"127.0.0.1:{free_port()}" if tcp else None
        args = [
            cairnd_binary(),
            "--socket", self.socket,
            "--memory-dir", self.memory_dir,
            "--disk-dir", str(self.dir / "disk"),
            "--metrics-addr", "127.0.0.1:0",
        ]  # fmt: skip
        if self.tcp_addr:
            args += ["--tcp-addr", self.tcp_addr]
        if tenant:
            args += ["--tenant", tenant]
        if memory_capacity is not None:
            args += ["--memory-capacity", str(memory_capacity)]
        if config is not None:
            config_path = self.dir / "cairnd.toml"
            config_path.write_text(config)
            args += ["--config", str(config_path)]
        self._args = args
        self.log_path = self.dir / "cairnd.log"
        self._log = open(self.log_path, "wb")
        self.paused = False
        self.process = self._spawn()
        self._wait_ready()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # The daemon reads CAIRN_* variables too: give it only its flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN")}
        return subprocess.Popen(self._args, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"cairnd exited early:\n{self.log()}")
            if os.path.exists(self.socket):
                # A fresh channel each time: a refused one waits out gRPC's
                # reconnect backoff (a stale socket stays after a SIGKILL).
                with cairn.Client(self.socket, retry_for=0) as probe:
                    if probe.ping(timeout=1.0):
                        return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"cairnd not ready after {timeout}s:\n{self.log()}")

    def client(self, **kwargs: object) -> cairn.Client:
        return cairn.Client(self.socket, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILLs the daemon (as an OOM kill would); its directories stay."""
        self.resume()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def start(self) -> None:
        """Starts the daemon again on the same socket and directories."""
        if self.process.poll() is None:
            raise RuntimeError("cairnd is still running")
        if self._log.closed:
            self._log = open(self.log_path, "ab")
        self.process = self._spawn()
        self._wait_ready()

    def restart(self, down_for: float = 0.0) -> None:
        """SIGKILL, ``down_for`` seconds with no daemon, then start again."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def pause(self) -> None:
        """SIGSTOPs the daemon: it keeps its socket but answers nothing.

        Returns once every thread of it is stopped (the signal is delivered
        asynchronously; a running thread could answer one more call).
        """
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True
        deadline = time.monotonic() + 10
        tasks = Path(f"/proc/{self.process.pid}/task")
        while time.monotonic() < deadline:
            states = []
            for task in tasks.iterdir():
                try:
                    stat = (task / "stat").read_text()
                except OSError:
                    continue  # the thread exited
                states.append(stat.rsplit(")", 1)[1].split()[0])
            if all(state in ("T", "t") for state in states):
                return
            time.sleep(0.005)
        raise RuntimeError(f"cairnd (pid {self.process.pid}) did not stop after SIGSTOP")

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        shutil.rmtree(self.memory_dir, ignore_errors=True)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """A daemon shared by the tests that only add steps under unique job names."""
    d = Daemon(tcp=True)
    yield d
    d.cleanup()


@pytest.fixture
def fresh_daemon() -> Iterator[Daemon]:
    """A daemon of the test's own, for tests that stop it or fill it up."""
    d = Daemon()
    yield d
    d.cleanup()


@pytest.fixture
def restartable_daemon() -> Iterator[Daemon]:
    """A daemon of the test's own that the test kills, restarts or stops
    (``kill``, ``start``, ``restart``, ``pause``, ``resume``); it is
    resumed and removed afterwards whatever state the test left it in."""
    d = Daemon()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[cairn.Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def job(request: pytest.FixtureRequest) -> str:
    """A job name of the test's own."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name).strip("-_")[:40]
    return f"{name or 'job'}-{uuid.uuid4().hex[:8]}"
