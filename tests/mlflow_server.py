"""A real `mlflow server` on loopback for the tests, artifacts served over HTTP (``--serve-artifacts``):
its backend is a fresh PostgreSQL database where FLAME_KD_TEST_POSTGRES names a server (CI), else
SQLite. Started by the tests and stopped after them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

POSTGRES = os.environ.get("FLAME_KD_TEST_POSTGRES")
PASSWORD = "s3cret-pw"  # CI's server trusts loopback and ignores it: a password to keep out of logs


def fresh_database(prefix: str) -> str:
    """CREATE DATABASE <prefix>_<random> on the PostgreSQL test server; its SQLAlchemy URL."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES)
    if url.password is None:
        url = url.set(password=PASSWORD)
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                            dbname=url.database)
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {name}")
    conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` in its own process group, on a free loopback port; ``stop`` and ``start``
    again play a server that goes away and comes back (same backend, artifacts and port)."""

    def __init__(self, folder: Path, timeout: float = 180):
        self.folder, self.timeout = folder, timeout
        self.backend = fresh_database("mlflow") if POSTGRES else f"sqlite:///{folder / 'server.db'}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self) -> None:
        self.log = open(self.folder / "server.log", "a")
        mlflow = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", self.backend, "--serve-artifacts",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.folder, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).read()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.close()
                    raise RuntimeError(f"mlflow server did not start: {(self.folder / 'server.log').read_text()[-2000:]}")
                time.sleep(1)

    def close(self) -> None:
        """Stop the server (its whole process group) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    stop = close
