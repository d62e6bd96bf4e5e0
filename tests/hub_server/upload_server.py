"""TEST DOUBLE of the Hugging Face Hub *upload* API. Not a Hub implementation; used only by the tests.

No installable server accepts uploads (docs/facts.md, 4), so the tests drive the real `huggingface_hub`
client (`HfApi.create_repo`, `create_branch`, `create_commit`, `repo_exists`) against this minimal stdlib
`http.server`. It implements exactly the endpoints that client uses for a regular (non-LFS, non-Xet) commit:

    POST /api/repos/create                         -> create the repo (git init + initial commit), 409 if it exists
    POST /api/validate-yaml                        -> {"errors": [], "warnings": []} (or 400 when told to)
    POST /api/models/{org}/{name}/branch/{branch}  -> create a branch (409 if it exists)
    POST /api/models/{org}/{name}/preupload/{rev}  -> every file uploadMode "regular" (no LFS / Xet)
    POST /api/models/{org}/{name}/commit/{rev}     -> NDJSON header / file (base64) / deletedFile -> one git commit
    GET  /api/models/{org}/{name}[/revision/{rev}] -> minimal repo info (id, sha, private, siblings)

Every pushed file lands as a commit in a plain git repository under `<mirrors>/models/<org>/<name>`: the layout that
`olah` serves in offline mode, so a test can push here and pull through the real `olah` (tests/hub_server/olah.py).
A commit is written with git plumbing on a temporary index and published by one compare-and-swap `update-ref`, so a
failed request never moves the branch (nothing half-uploaded). Auth: every request but validate-yaml must carry
`Bearer <token>`.
Loopback only; requests are handled one at a time; every body read is bounded by Content-Length.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import unquote, urlsplit

MAX_BODY_BYTES = 64 * 1024 * 1024  # far above anything a tuned schedule needs; refuse larger bodies
_REPO = r"(?P<org>[\w.-]+)/(?P<name>[\w.-]+)"
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "hub-test-double",
    "GIT_AUTHOR_EMAIL": "double@localhost",
    "GIT_COMMITTER_NAME": "hub-test-double",
    "GIT_COMMITTER_EMAIL": "double@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": os.devnull,
}


class _GitRepo:
    """A git repository written only through plumbing commands (the working tree is never touched)."""

    def __init__(self, path: str):
        self.path = path

    def git(self, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        full_env = {**os.environ, **_GIT_ENV, **(env or {})}
        out = subprocess.run(
            ["git", "-C", self.path, *args], input=input, env=full_env, capture_output=True, check=True, timeout=30
        )
        return out.stdout.decode().strip()

    def head(self, branch: str) -> str | None:
        try:
            return self.git("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}")
        except subprocess.CalledProcessError:
            return None

    def init(self) -> None:
        os.makedirs(self.path)
        self.git("init", "-q", "-b", "main")
        # The Hub creates every repo with one commit holding .gitattributes; do the same so `main` exists.
        self.commit("main", [(".gitattributes", b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")], [],
                    "initial commit")

    def commit(self, branch: str, files: list[tuple[str, bytes]], deleted: list[str], message: str) -> str:
        parent = self.head(branch)
        index = os.path.join(self.path, ".git", f"double-index-{threading.get_ident()}")
        env = {"GIT_INDEX_FILE": index}
        try:
            if parent is not None:
                self.git("read-tree", parent, env=env)
            for path, content in files:
                blob = self.git("hash-object", "-w", "--stdin", input=content)
                self.git("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
            for path in deleted:
                self.git("update-index", "--force-remove", path, env=env)
            tree = self.git("write-tree", env=env)
        finally:
            if os.path.exists(index):
                os.remove(index)
        args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
        new = self.git(*args)
        # Compare-and-swap: the branch moves from exactly `parent` to `new`, or not at all.
        self.git("update-ref", f"refs/heads/{branch}", new, parent or "0" * 40)
        return new

    def files(self, rev: str) -> list[str]:
        out = self.git("ls-tree", "-r", "--name-only", rev)
        return [line for line in out.splitlines() if line]


class UploadServerState:
    """What the double knows: where repos live, the one accepted token, and test switches."""

    def __init__(self, mirrors_path: str, token: str):
        self.mirrors_path = mirrors_path
        self.token = token
        self.private: dict[str, bool] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) log, for assertions on what the client sent
        self.fail_commit_with: int | None = None  # e.g. 500: the commit endpoint answers this instead of committing
        self.yaml_error: str | None = None  # validate-yaml answers 400 with this text (as the Hub does)
        self.lock = threading.Lock()

    def repo(self, org: str, name: str) -> _GitRepo:
        return _GitRepo(os.path.join(self.mirrors_path, "models", org, name))


class _Handler(BaseHTTPRequestHandler):
    server_version = "hub-upload-test-double/0"
    state: UploadServerState  # set on the subclass built by UploadServer

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # -- helpers ------------------------------------------------------------------------------------------------
    def _send(self, status: int, payload=None, headers: dict | None = None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.state.token}":
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _route(self):
        path = unquote(urlsplit(self.path).path)
        with self.state.lock:
            self.state.requests.append((self.command, path))
        return path

    # -- GET ----------------------------------------------------------------------------------------------------
    def do_GET(self):
        path = self._route()
        if not self._authorized():
            return
        m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path)
        if not m:
            return self._error(404, f"test double does not implement GET {path}")
        repo = self.state.repo(m["org"], m["name"])
        if not os.path.isdir(repo.path):
            return self._error(404, "Repository not found", "RepoNotFound")
        rev = m["rev"] or "main"
        sha = repo.head(rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        repo_id = f"{m['org']}/{m['name']}"
        self._send(200, {
            "id": repo_id, "modelId": repo_id, "sha": sha, "private": self.state.private.get(repo_id, False),
            "siblings": [{"rfilename": f} for f in repo.files(sha)],
        })

    # -- POST ---------------------------------------------------------------------------------------------------
    def do_POST(self):
        path = self._route()
        try:
            body = self._body()
        except ValueError as err:
            return self._error(413, str(err))
        if path == "/api/validate-yaml":  # anonymous on the Hub too (ModelCard.validate sends no token)
            if self.state.yaml_error:
                return self._error(400, self.state.yaml_error)
            return self._send(200, {"errors": [], "warnings": []})
        if not self._authorized():
            return
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        m = re.fullmatch(rf"/api/models/{_REPO}/(?P<op>branch|preupload|commit)/(?P<rev>.+)", path)
        if not m:
            return self._error(404, f"test double does not implement POST {path}")
        repo = self.state.repo(m["org"], m["name"])
        if not os.path.isdir(repo.path):
            return self._error(404, "Repository not found", "RepoNotFound")
        if m["op"] == "branch":
            return self._create_branch(repo, m["rev"], json.loads(body or b"{}"))
        if repo.head(m["rev"]) is None:
            return self._error(404, f"Invalid rev id: {m['rev']}", "RevisionNotFound")
        if m["op"] == "preupload":
            files = json.loads(body)["files"]
            return self._send(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
            ]})
        return self._commit(repo, m, body)

    def _create_repo(self, payload: dict) -> None:
        if payload.get("type", "model") not in (None, "model"):
            return self._error(400, "test double only hosts model repos")
        org, name = payload.get("organization"), payload["name"]
        if not org:
            return self._error(400, "test double needs an explicit organization: use 'org/name'")
        repo = self.state.repo(org, name)
        repo_id = f"{org}/{name}"
        with self.state.lock:
            if os.path.isdir(repo.path):
                # The Hub's 409 body carries the repo url too; create_repo(exist_ok=True) reads it.
                return self._send(409, {"error": "You already created this model repo",
                                        "url": f"http://{self.headers['Host']}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            repo.init()
            self.state.private[repo_id] = bool(payload.get("private") or payload.get("visibility") == "private")
        self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})

    def _create_branch(self, repo: _GitRepo, branch: str, payload: dict) -> None:
        with self.state.lock:
            if repo.head(branch) is not None:
                return self._error(409, "Reference already exists")
            start = repo.head(payload.get("startingPoint") or "main")
            repo.git("update-ref", f"refs/heads/{branch}", start, "0" * 40)
        self._send(200, {})

    def _commit(self, repo: _GitRepo, m, body: bytes) -> None:
        if self.state.fail_commit_with is not None:
            return self._error(self.state.fail_commit_with, "commit refused by the test double (fault injection)")
        header, files, deleted = None, [], []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file" and item["value"].get("encoding") == "base64":
                files.append((item["value"]["path"], base64.b64decode(item["value"]["content"])))
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
            else:
                return self._error(400, f"test double does not implement commit operation {item['key']!r}")
        if header is None:
            return self._error(400, "commit payload has no header line")
        message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
        with self.state.lock:
            try:
                sha = repo.commit(m["rev"], files, deleted, message)
            except subprocess.CalledProcessError as err:
                return self._error(409, f"commit failed: {err.stderr.decode(errors='replace')}")
        repo_id = f"{m['org']}/{m['name']}"
        self._send(200, {"commitOid": sha, "commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}",
                         "pullRequestUrl": None})


class UploadServer:
    """Runs the test double on 127.0.0.1 in a daemon thread. `url` is the endpoint to give `HfApi`."""

    def __init__(self, mirrors_path: str, token: str, port: int = 0):
        self.state = UploadServerState(mirrors_path, token)
        handler = type("BoundHandler", (_Handler,), {"state": self.state})
        self._httpd = HTTPServer(("127.0.0.1", port), handler)
        self._httpd.timeout = 1.0
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> "UploadServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
