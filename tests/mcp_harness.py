"""The test MCP server (tests/tools/mcp_server.py) as tests use it: its stdio command, and the
same server over streamable HTTP as a process of its own on a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.conditions import wait_for

SERVER_SCRIPT = Path(__file__).resolve().parent / "tools" / "mcp_server.py"
SCRIPT_MODEL_CONFIG_ID = "00000000-0000-0000-0000-0000000000e1"


def stdio_transport(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The API's transport object that runs the test server over stdio."""
    return {
        "type": "stdio",
        "command": sys.executable,
        "args": [str(SERVER_SCRIPT), "stdio"],
        "env": env or {},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.asynccontextmanager
async def http_mcp_server(**env: str) -> AsyncIterator[str]:
    """The test server over streamable HTTP; yields its URL. Killed at exit."""
    port = _free_port()
    process = _spawn(port, env)
    try:

        def listening() -> bool:
            assert process.poll() is None, f"the MCP server exited with {process.returncode}"
            return _accepts(port)

        await wait_for(listening, timeout_s=60, message="the HTTP MCP server listening")
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.kill()
        process.wait()


def _spawn(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "http", "--port", str(port)],
        env=os.environ | env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not alive either.
    with contextlib.suppress(FileNotFoundError):
        status = Path(f"/proc/{pid}/stat").read_text()
        return status.rsplit(")", 1)[1].split()[0] != "Z"
    return True
