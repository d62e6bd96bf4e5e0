"""Start and stop a real `olah` Hub mirror (PyPI `olah`, MIT) in offline mode, serving local git repositories.

olah reads `<mirrors>/models/<org>/<name>` (committed git repos, branch `main`) and answers the Hub download API
(`/api/models/...`, `/{repo}/resolve/{rev}/{path}`), so `huggingface_hub` and diffusers' `from_pretrained` run
unchanged against it through `HF_ENDPOINT`. Quirks (REFERENCE.md section 4): a missing file answers 401
RepositoryNotFound, `model_info` needs an explicit revision, GET / answers 500 (so readiness is polled on a repo
revision URL that is expected to answer 401/200, never on /).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
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


class OlahServer:
    """`olah-cli -c <config>` as a subprocess on a free loopback port; `url` is the value for `HF_ENDPOINT`."""

    def __init__(self, root: str):
        self.root = root
        self.mirrors_path = os.path.join(root, "mirrors")
        self.repos_path = os.path.join(root, "olah-cache")
        os.makedirs(self.mirrors_path, exist_ok=True)
        os.makedirs(self.repos_path, exist_ok=True)
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(root, "olah.toml")
        self.log_path = os.path.join(root, "olah.log")
        self._proc: subprocess.Popen | None = None

    def _write_config(self) -> None:
        netloc = f"127.0.0.1:{self.port}"
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
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        # Any HTTP answer (401 for an unknown repo) means uvicorn is serving; connection errors mean not yet.
        probe = f"{self.url}/api/models/readiness/probe/revision/main"
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
