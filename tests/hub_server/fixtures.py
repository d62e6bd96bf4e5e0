"""pytest fixtures for the Hub tests (imported by tests/test_hub*.py; conftest.py stays untouched).

- `hub_servers` (module scope): a real `olah` (downloads) and the upload test double sharing one mirrors folder, both
  on free 127.0.0.1 ports; stopped at the end of the module.
- `hub_env` (per test): an isolated HF_HOME / cache / token file, and `use(url)` to point the client at a server.
  huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE... once, at import, into
  `huggingface_hub.constants`; the fixture sets both the environment variables and those constants (pytest's
  monkeypatch undoes both), so the in-process client behaves exactly as a fresh process with that environment.
  The offline test additionally runs a real subprocess with only the environment set.
"""
from __future__ import annotations

import os

import pytest

from .olah import OlahServer
from .upload_server import UploadServer

TEST_TOKEN = "hf_test_double_token"  # accepted by the upload double only; never a real credential


@pytest.fixture(scope="module")
def hub_servers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hub"))
    olah = OlahServer(root).start()
    upload = UploadServer(olah.mirrors_path, TEST_TOKEN).start()
    try:
        yield type("HubServers", (), {"olah": olah, "upload": upload, "mirrors_path": olah.mirrors_path})
    finally:
        upload.stop()
        olah.stop()


class HubEnv:
    def __init__(self, monkeypatch, home: str):
        from huggingface_hub import constants

        self._mp = monkeypatch
        self._constants = constants
        self.home = home
        self.cache = os.path.join(home, "hub")
        env = {"HF_HOME": home, "HF_HUB_CACHE": self.cache, "HF_XET_CACHE": os.path.join(home, "xet")}
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        unset = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE")
        for var in unset:
            monkeypatch.delenv(var, raising=False)
        for name, value in {
            "HF_HOME": home,
            "HF_HUB_CACHE": self.cache,
            "HUGGINGFACE_HUB_CACHE": self.cache,
            "HF_ASSETS_CACHE": os.path.join(home, "assets"),
            "HF_XET_CACHE": os.path.join(home, "xet"),
            "HF_TOKEN_PATH": os.path.join(home, "token"),
            "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        }.items():
            monkeypatch.setattr(constants, name, value)

    def use(self, url: str) -> None:
        """Point every Hub call (HfApi, hf_hub_download, from_pretrained) at `url`."""
        self._mp.setenv("HF_ENDPOINT", url)
        self._mp.setattr(self._constants, "ENDPOINT", url)
        template = url + "/{repo_id}/resolve/{revision}/{filename}"
        self._mp.setattr(self._constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)

    def login(self, token: str = TEST_TOKEN) -> None:
        self._mp.setenv("HF_TOKEN", token)

    def offline(self) -> None:
        self._mp.setenv("HF_HUB_OFFLINE", "1")
        self._mp.setattr(self._constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    return HubEnv(monkeypatch, str(tmp_path / "hf_home"))
