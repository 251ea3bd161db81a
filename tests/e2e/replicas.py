"""Real `chatd serve` processes for end-to-end tests: started with a chosen environment, waited
on until healthy, and stopped or crashed with real signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from app.db.sql_files import PROJECT_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ReplicaProcess:
    def __init__(
        self,
        *,
        log_dir: Path,
        env: dict[str, str],
        name: str = "replica",
        command: list[str] | None = None,
        cwd: Path = PROJECT_ROOT,
        port: int | None = None,
    ) -> None:
        # By default the checkout's code (`make run`); a test of an installed chatd passes its
        # own `chatd serve` and a directory outside the checkout.
        self._command = command or [sys.executable, "-m", "app.cli", "serve"]
        self._cwd = cwd
        # A given port: a replacement for a replica that died, at the address its clients use.
        self.port = port if port is not None else free_port()
        self.name = name
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self._env = os.environ | {"CHATD_PORT": str(self.port)} | env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self._command,
            cwd=self._cwd,
            env=self._env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()

    async def wait_healthy(self, timeout_s: float = 30.0, path: str = "/readyz") -> None:
        async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
            while True:
                self._fail_if_exited()
                try:
                    async with session.get(self.url + path) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    def _fail_if_exited(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.process.returncode}:\n{self.logs()[-4000:]}"
            )

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        process = self.process
        return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout_s)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()


@contextlib.asynccontextmanager
async def replica_pair(
    log_dir: Path, env: dict[str, str]
) -> AsyncIterator[tuple[ReplicaProcess, ReplicaProcess]]:
    """Two replicas ("a" and "b") with `env`, healthy; SIGKILLed when the block exits."""
    pair = tuple(ReplicaProcess(log_dir=log_dir, name=name, env=env) for name in ("a", "b"))
    try:
        for replica in pair:
            replica.start()
        await asyncio.gather(*(replica.wait_healthy(timeout_s=60) for replica in pair))
        yield pair[0], pair[1]
    finally:
        for replica in pair:
            replica.kill()
