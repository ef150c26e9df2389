"""Real servers for the tests, on 127.0.0.1 and free ports: a throwaway PostgreSQL cluster (Debian's
``postgresql`` binaries) and an ``mlflow server`` process. Both are stopped and deleted afterwards."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_USER, PG_PASSWORD = "sweeper", "s3cret-pw"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<version>/bin."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    found = shutil.which("pg_ctl")
    for pg_ctl in ([Path(found).resolve()] if found else []) + [Path(c) for c in reversed(candidates)]:
        if all((pg_ctl.parent / name).is_file() for name in ("initdb", "psql")):
            return pg_ctl.parent
    return None


def _missing(reason: str) -> None:
    """Skip locally; fail where CI promised a server (.ci/run installs postgresql and sets the variable)."""
    if os.environ.get("LORA_SWEEP_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason}, and LORA_SWEEP_REQUIRE_POSTGRES=1")
    pytest.skip(f"{reason} (apt-get install postgresql; .ci/run installs it)")


@contextlib.contextmanager
def postgres_server() -> Iterator[dict[str, str]]:
    """Start a cluster, create a password user owning databases ``optuna`` and ``mlflow``; yield their
    URLs."""
    bindir = postgres_bin()
    if bindir is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl) not found")
    as_user: list[str] = []
    folder = Path(
        tempfile.mkdtemp(prefix="lora_sweep_pg_")
    )  # not under pytest's root-only tmp: postgres must reach it
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres system user
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            _missing("running as root and there is no 'postgres' system user")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    try:
        (folder / "pw").write_text("postgres\n")
        if as_user:
            os.chown(folder / "pw", account.pw_uid, account.pw_gid)
        subprocess.run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--pwfile",
                str(folder / "pw"),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} -c fsync=off"
        subprocess.run(
            [
                *as_user,
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(folder / "log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        psql = [
            *as_user,
            str(bindir / "psql"),
            "-h",
            str(folder),
            "-p",
            str(port),
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
        ]
        for statement in (
            f"CREATE USER {PG_USER} CREATEDB PASSWORD '{PG_PASSWORD}'",
            f"CREATE DATABASE optuna OWNER {PG_USER}",
            f"CREATE DATABASE mlflow OWNER {PG_USER}",
        ):
            subprocess.run([*psql, "-c", statement], check=True, capture_output=True, text=True)
        base = f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{port}"
        yield {
            "optuna": f"{base}/optuna",
            "mlflow": f"{base}/mlflow",
            "port": str(port),
            "log": str(folder / "log"),
        }
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{err.cmd[len(as_user)]} failed: {err.stderr or err.stdout}") from err
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, folder: Path) -> Iterator[str]:
    """``mlflow server`` with one worker and no job runner (2 processes instead of ~15), artifacts proxied
    into ``folder/artifacts``; yields its http URL."""
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(folder / "mlflow_server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_store_uri,
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(
                        "mlflow server did not come up: " + (folder / "mlflow_server.log").read_text()[-2000:]
                    )
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
