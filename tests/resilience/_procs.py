"""Processes the fault tests start (backends, a control plane); every one is stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class Proc:
    """A child process; ``kill()`` is SIGKILL (the process is gone, its ports closed)."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


class BackendProc(Proc):
    def __init__(self, name: str, mode: str) -> None:
        self.count_file = Path(tempfile.mkdtemp()) / "accepted"
        super().__init__(
            [sys.executable, str(HERE / "_backend.py"), name, mode, str(self.count_file)]
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if not line.strip():
            self.kill()
            raise RuntimeError(f"backend {name} did not start")
        self.port = int(line)
        self.mode = mode

    def count(self) -> int:
        """Requests served (``hang``: connections accepted)."""
        if self.mode == "hang":
            return int(self.count_file.read_text()) if self.count_file.exists() else 0
        return int(httpx.get(f"http://127.0.0.1:{self.port}/_count", timeout=5).text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ControlPlaneProc(Proc):
    """``pymesh control-plane`` in its own process on a fixed port (so a restart is the same
    address to the clients)."""

    def __init__(self, config_dir: Path, port: int) -> None:
        super().__init__(
            [
                sys.executable,
                "-m",
                "pymesh",
                "control-plane",
                "-c",
                str(config_dir),
                "--xds-address",
                f"127.0.0.1:{port}",
                "--admin-port",
                "-1",
                "--no-ca",
                "--debounce",
                "0.02",
                "--log-level",
                "WARNING",
            ]
        )
        self.address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"control plane exited: {self.popen.stderr.read()}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("control plane did not start")
