"""An installed chatd (a wheel, as `pip install .` or a container image makes it) runs without
the checkout: it carries its SQL, migrates a fresh database and serves.

The wheel is built from a copy of the sources and installed without dependencies into a fresh
venv; the venv sees the shared venv's dependencies through a .pth line naming its site-packages
(a plain line adds the directory but runs none of its .pth files, so the shared venv's editable
finder for the checkout's `app` stays out). Every command runs from a directory outside the
checkout."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import sysconfig
import zipfile
from pathlib import Path

import asyncpg
import pytest

from app.db.migrate import load_migrations
from app.db.sql_files import PROJECT_ROOT
from tests.e2e.replicas import ReplicaProcess

pytestmark = pytest.mark.e2e

# Building resolves the build backend (setuptools) from the package index or pip's cache.
COMMAND_TIMEOUT_S = 120.0
# What the wheel is built from: everything pyproject.toml packages, and nothing else.
SOURCES = ("pyproject.toml", "README.md", "app", "sql", "triggers")


async def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{command} exited with {process.returncode}:\n{text}"
    return text


async def build_wheel(work: Path) -> Path:
    # A copy, so the build's scratch files (build/, *.egg-info) never land in the checkout.
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        origin = PROJECT_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    dist = work / "dist"
    await run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, source, cwd=work
    )
    (wheel,) = dist.glob("chatd-*.whl")
    return wheel


async def install_in_fresh_venv(wheel: Path, venv: Path) -> None:
    await run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    await run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        venv / "bin" / "python",
        "install",
        "--no-deps",
        "--quiet",
        wheel,
        cwd=venv.parent,
    )
    site_packages = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site_packages /= "site-packages"
    shared = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "shared_dependencies.pth").write_text("".join(f"{p}\n" for p in shared))


async def test_an_installed_wheel_migrates_and_serves_without_the_checkout(
    tmp_path: Path, empty_database: str
) -> None:
    database_url = empty_database
    wheel = await build_wheel(tmp_path)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    # Every module of the checkout is in the wheel (pyproject.toml lists the packages by hand).
    modules = {p.relative_to(PROJECT_ROOT).as_posix() for p in (PROJECT_ROOT / "app").rglob("*.py")}
    assert modules - shipped == set()
    # And the SQL is, inside the package.
    assert "app/_sql/schema.sql" in shipped
    assert "app/_triggers/chats_v1.sql" in shipped
    # And the web page's files (app/web/static).
    static = PROJECT_ROOT / "app" / "web" / "static"
    assert {f"app/web/static/{page.name}" for page in static.iterdir()} - shipped == set()

    venv = tmp_path / "venv"
    await install_in_fresh_venv(wheel, venv)
    # Outside the checkout, and without a PYTHONPATH that could lead back into it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    where = await run(
        venv / "bin" / "python",
        "-c",
        "import app, app.db.sql_files as f; print(app.__file__); print(f.MIGRATIONS_DIR)",
        cwd=elsewhere,
        env=env,
    )
    package_file, migrations_dir = where.split()
    assert Path(package_file).is_relative_to(venv), where
    assert Path(migrations_dir).is_relative_to(venv), where

    output = await run(
        venv / "bin" / "chatd", "migrate", cwd=elsewhere, env=env | {"DATABASE_URL": database_url}
    )
    assert f"applied {len(load_migrations())} migration(s)" in output
    # The installed SQL is byte for byte the checkout's: a database migrated by one is accepted
    # by the other.
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version, checksum FROM chatd_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [(r["version"], r["checksum"]) for r in rows] == [
        (m.version, m.checksum) for m in load_migrations()
    ]

    replica = ReplicaProcess(
        log_dir=tmp_path,
        env={"DATABASE_URL": database_url, "PYTHONPATH": ""},
        command=[str(venv / "bin" / "chatd"), "serve"],
        cwd=elsewhere,
    )
    replica.start()
    try:
        await replica.wait_healthy(timeout_s=60)
        # The page is served from inside the installed package.
        await replica.wait_healthy(timeout_s=10, path="/static/app.js")
        replica.signal(signal.SIGTERM)
        assert await replica.wait_exit() == 0
    finally:
        replica.kill()
