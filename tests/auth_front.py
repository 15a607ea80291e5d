"""A real `mlflow server` on loopback behind a small basic-auth front (a forwarding proxy in this
process), as a password-protected tracking server is deployed; the front can be taken down and
brought back to play a server that goes away mid-run."""

from __future__ import annotations

import base64
import http.client
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

USER, PASSWORD = "admin", "Pa55w0rd-xyzzy"  # the secret no output may show


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Front(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: int = 0
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    down = False  # a server gone: every connection is closed unanswered
    fail_when = None  # (path, body) -> bool: go down from the first request that matches
    seen_auth: list[str] = []

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        cls = type(self)
        if cls.fail_when is not None and cls.fail_when(self.path, body):
            cls.down, cls.fail_when = True, None
        if cls.down:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        auth = self.headers.get("Authorization", "")
        cls.seen_auth.append(auth)
        if auth != cls.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", cls.upstream, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host", "connection")}
        headers["Host"] = f"127.0.0.1:{cls.upstream}"
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward  # noqa: N815 (http.server's names)

    def log_message(self, *args):
        pass


class AuthFront:
    """``url`` (with credentials), ``bare`` (without) and ``store`` (the server's own SQLite file)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.store = f"sqlite:///{folder / 'server.db'}"
        log = open(folder / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        self.handler = type("Front", (_Front,), {"upstream": self.port, "seen_auth": []})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.front_port = self.httpd.server_address[1]
        self._wait()

    @property
    def url(self) -> str:
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{self.front_port}"

    @property
    def bare(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    def _wait(self, seconds: float = 240) -> None:
        end = time.time() + seconds
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited: " + (self.folder / "server.log").read_text()[-2000:])
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("mlflow server did not start: " + (self.folder / "server.log").read_text()[-2000:])

    def reset(self) -> None:
        self.handler.down, self.handler.fail_when = False, None

    def close(self) -> None:
        for httpd in [self.httpd, *getattr(self, "tls_servers", [])]:
            httpd.shutdown()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tls_front(front: AuthFront, folder: Path) -> tuple[str, Path]:
    """The same front over TLS with a private, self-signed certificate: (bare https URL, the cert)."""
    import ssl

    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), front.handler)
    httpd.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    front.tls_servers = [*getattr(front, "tls_servers", []), httpd]
    return f"https://127.0.0.1:{httpd.server_address[1]}", cert
