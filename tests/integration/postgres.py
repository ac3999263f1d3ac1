"""A throwaway PostgreSQL server for tests: Debian's binaries (`make postgresql` installs them),
a fresh cluster in a temporary folder, listening on a free loopback port with password auth.

PostgreSQL refuses to run as root: as root the server runs as the `postgres` system user (which
Debian's package creates), in a folder that user owns."""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.cli.launcher import free_port

HOST = "127.0.0.1"
USER = "chatfleet"
DATABASE = "chatfleet"
START_TIMEOUT_S = 60


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries here, or no user to run them as."""


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin (Debian), else the folder of pg_ctl on PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)],
    )
    if debian:
        return debian[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise PostgresMissing(
        "PostgreSQL's server binaries are not installed: `make postgresql` installs Debian's "
        "postgresql package"
    )


def _run_as() -> dict[str, Any]:
    """subprocess arguments to run the server as an unprivileged user (only needed as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresMissing(
            "running as root and there is no `postgres` user to run PostgreSQL as"
        ) from None
    return {"user": account.pw_uid, "group": account.pw_gid}


@dataclass
class PostgresServer:
    """`start()` makes and starts the cluster; `dsn` reaches it; `stop()` removes it all."""

    bin_dir: Path = field(default_factory=find_bin_dir)
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    folder: Path | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}:{self.password}@{HOST}:{self.port}/{DATABASE}"

    @property
    def log(self) -> str:
        path = self.folder and self.folder / "server.log"
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
            **_run_as(),
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed:\n{done.stdout}{done.stderr}{self.log}")

    def start(self) -> None:
        run_as = _run_as()
        # In /tmp itself (not pytest's private tmp folder), so the postgres user can reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="chatfleet-pg-"))
        if run_as:
            os.chown(self.folder, run_as["user"], run_as["group"])
        password_file = self.folder / "password"
        password_file.write_text(self.password)
        if run_as:
            os.chown(password_file, run_as["user"], run_as["group"])
        data = str(self.folder / "data")
        self._run(
            "initdb", "-D", data, "-U", USER, f"--pwfile={password_file}", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses={HOST} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        # -w: pg_ctl returns once the server accepts connections.
        log = str(self.folder / "server.log")
        self._run("pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start")
        self._run("createdb", "-h", str(self.folder), "-p", str(self.port), "-U", USER, DATABASE)

    def stop(self) -> None:
        if self.folder is None:
            return
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
