"""Start and stop a real `olah` Hub mirror (PyPI `olah`, MIT) in offline mode, serving local git repositories.

olah reads `<mirrors>/models/<org>/<name>` (committed git repos, branch `main`) and answers the Hub download API
(`/api/models/...`, `/{repo}/resolve/{rev}/{path}`), so `huggingface_hub` and diffusers' `from_pretrained` run
unchanged against it through `HF_ENDPOINT`. Where olah differs from the Hub, the difference is handled here, never
in the library:
- olah answers 401 RepositoryNotFound for a missing file (or revision) of an existing repo, where the Hub answers 404
  EntryNotFound (or RevisionNotFound). `OlahServer.url` is therefore a small pass-through proxy (`_HubAnswers`) that
  rewrites exactly those answers the Hub's way; everything else passes unchanged.
- GET / answers 500, so readiness is polled on a repo revision URL that is expected to answer 401/200, never on /.
"""
from __future__ import annotations

import http.client
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from .upload_server import _GitRepo

READY_TIMEOUT_S = 30.0


def free_loopback_port() -> int:
    """A port the OS reports free on 127.0.0.1 (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_git_repo(mirrors_path: str, repo_id: str, files: dict[str, bytes | str], message: str = "add files") -> str:
    """Create (or extend) `<mirrors>/models/<repo_id>` with one commit on `main` holding `files`; returns the sha."""
    org, name = repo_id.split("/")
    repo = _GitRepo(os.path.join(mirrors_path, "models", org, name))
    if not os.path.isdir(repo.path):
        repo.init()
    encoded = [(path, data.encode() if isinstance(data, str) else data) for path, data in files.items()]
    return repo.commit("main", encoded, [], message)


_RESOLVE_RE = re.compile(r"^/(?P<org>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/")


class _HubAnswers(http.server.ThreadingHTTPServer):
    """Forwards every request to olah; a 401 for a `/resolve/` URL of a repo that exists in the mirrors folder is
    answered as the Hub does: 404 with `X-Error-Code: RevisionNotFound` when the revision is not a commit of that
    repo, else 404 `EntryNotFound`."""

    daemon_threads = True

    def __init__(self, port: int, olah_port: int, mirrors_path: str):
        self.olah_port, self.mirrors_path = olah_port, mirrors_path
        super().__init__(("127.0.0.1", port), _ForwardHandler)

    def hub_error_code(self, path: str) -> str | None:
        match = _RESOLVE_RE.match(path)
        if not match:
            return None
        repo = _GitRepo(os.path.join(self.mirrors_path, "models", match["org"], match["name"]))
        if not os.path.isdir(repo.path):
            return None
        known = subprocess.run(["git", "-C", repo.path, "cat-file", "-e", f"{match['rev']}^{{commit}}"],
                               capture_output=True).returncode == 0
        return "EntryNotFound" if known else "RevisionNotFound"


class _ForwardHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    _HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP_BY_HOP | {"host"}}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.olah_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            status, reply_headers, data = answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()
        code = self.server.hub_error_code(self.path.split("?")[0]) if status == 401 else None
        if code is not None:
            status, reply_headers, data = 404, [("X-Error-Code", code)], f'{{"error": "{code}"}}'.encode()
        self.send_response(status)
        for key, value in reply_headers:
            # a HEAD answer keeps olah's Content-Length (the size of the file a GET would send)
            if key.lower() not in self._HOP_BY_HOP or (self.command == "HEAD" and key.lower() == "content-length"):
                self.send_header(key, value)
        if self.command != "HEAD" or code is not None:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _forward


class OlahServer:
    """`olah-cli -c <config>` as a subprocess on a free loopback port, behind `_HubAnswers` on another; `url` (the
    proxy's) is the value for `HF_ENDPOINT`."""

    def __init__(self, root: str):
        self.root = root
        self.mirrors_path = os.path.join(root, "mirrors")
        self.repos_path = os.path.join(root, "olah-cache")
        os.makedirs(self.mirrors_path, exist_ok=True)
        os.makedirs(self.repos_path, exist_ok=True)
        self.port = free_loopback_port()  # olah itself
        self.proxy_port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.proxy_port}"
        self.config_path = os.path.join(root, "olah.toml")
        self.log_path = os.path.join(root, "olah.log")
        self._proc: subprocess.Popen | None = None
        self._proxy: _HubAnswers | None = None

    def _write_config(self) -> None:
        netloc = f"127.0.0.1:{self.proxy_port}"  # redirects olah writes point back through the proxy
        with open(self.config_path, "w") as f:
            f.write(
                "[basic]\n"
                'host = "127.0.0.1"\n'
                f"port = {self.port}\n"
                f'repos-path = "{self.repos_path}"\n'
                f'mirror-netloc = "{netloc}"\n'
                f'mirror-lfs-netloc = "{netloc}"\n'
                f'mirrors-path = ["{self.mirrors_path}"]\n'
                # Never reuse a branch -> sha lookup: tests push new commits and pull them right away.
                "metadata-cache-ttl = 0\n"
                "[accessibility]\n"
                "offline = true\n"
            )

    def start(self) -> "OlahServer":
        self._write_config()
        exe = shutil.which("olah-cli")
        cmd = [exe, "-c", self.config_path] if exe else [sys.executable, "-m", "olah.server", "-c", self.config_path]
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.root)
        self._proxy = _HubAnswers(self.proxy_port, self.port, self.mirrors_path)
        threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        # Any HTTP answer (401 for an unknown repo) means uvicorn is serving; connection errors mean not yet.
        probe = f"http://127.0.0.1:{self.port}/api/models/readiness/probe/revision/main"  # olah itself
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"olah exited with code {self._proc.returncode}; log:\n{self.log()}")
            try:
                urllib.request.urlopen(probe, timeout=1)
                return
            except urllib.error.HTTPError:
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah not ready after {READY_TIMEOUT_S}s; log:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
            self._proxy = None
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
