"""What produced a figure: command line, device, versions, git commit, the package's code fingerprint, UTC time,
and the JSON encoding of tensors / arrays used by every results file."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import torch

import diffusers_timetuner

from .cli_args import REPO


def json_default(o):
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "transformers", "accelerate", "numpy", "scipy", "sklearn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages: record their absence
            out[mod] = "not installed"
    out["diffusers_timetuner"] = diffusers_timetuner.__version__
    return out


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                               text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty-src" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def command_line() -> str:
    """The command as typed: ``python -m benchmarks.<script> ...`` when run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *program, *sys.argv[1:]])


def code_fingerprint() -> str:
    """Hash of the imported package's calibration, scheduler and sampling sources: a change there invalidates the
    cached calibration tables (see table_cache.py)."""
    h = hashlib.sha1()
    base = Path(diffusers_timetuner.__file__).resolve().parent
    for sub in ("calibration", "schedulers", "sampling.py", "denoiser.py", "table.py"):
        p = base / sub
        files = sorted(p.rglob("*.py")) if p.is_dir() else ([p] if p.exists() else [])
        for f in files:
            h.update(f.read_bytes())
    return h.hexdigest()[:10]
