"""Per-step checkpoints of a sequential calibration, written atomically (tmp file + ``os.replace``).

A checkpoint holds the taus decided so far for one step count, their per-step records and a fingerprint of every
setting that changes the result. Cached states are not stored: on resume they are recomputed by running the decided
steps from the same seeded x_T, which reproduces them bit for bit, so a resumed run ends with the same table as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, Optional


def _umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_json(path: str, payload: Any) -> None:
    """Write JSON so that ``path`` holds either the old or the new content, never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; the result gets the mode a plain open() gives
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Build a result folder in a temporary folder beside `path` and move it into place only when complete.

    Yields the temporary folder to write into. If the block raises (or the process dies), `path` is untouched: it
    still holds the previous result, or does not exist. On success the new folder replaces `path` in one step where
    the OS allows it (Linux: an atomic exchange), else by two renames.

    Args:
        path: the output folder.
        overwrite: `False` keeps what an existing `path` holds besides the files the block writes (those replace their
            old versions); `True` replaces the folder by exactly what the block wrote.

    Raises:
        ValueError: if `path` exists and is not a folder (checked before anything is written).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"The output folder {path} exists and is a file; choose a folder path or remove the file.")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result gets the mode a plain makedirs gives
    try:
        yield tmp
        if os.path.isdir(path) and not overwrite:
            for entry in os.listdir(path):
                src, dst = os.path.join(path, entry), os.path.join(tmp, entry)
                if os.path.lexists(dst):
                    continue  # the new result's version wins
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True)
                else:
                    shutil.copy2(src, dst, follow_symlinks=False)
        if not os.path.isdir(path):
            os.rename(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous result
        else:
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


class CheckpointStore:
    """Checkpoints under ``directory``: one file ``steps_<n>.json`` per step count.

    Args:
        directory: folder for the checkpoint files (created on first save).
        fingerprint: JSON-able settings; a checkpoint written with other settings is refused on resume.
        enabled: only the main process writes; others pass ``enabled=False`` and still read.
    """

    def __init__(self, directory: str, fingerprint: Dict[str, Any], enabled: bool = True):
        self.directory = directory
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.enabled = enabled

    def path(self, num_inference_steps: int) -> str:
        return os.path.join(self.directory, f"steps_{int(num_inference_steps)}.json")

    def save(self, num_inference_steps: int, state: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        atomic_write_json(self.path(num_inference_steps), {"fingerprint": self.fingerprint, "state": state})

    def load(self, num_inference_steps: int) -> Optional[Dict[str, Any]]:
        """The saved state for n, ``None`` if there is none; a ``ValueError`` if it came from other settings."""
        path = self.path(num_inference_steps)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                payload = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"The checkpoint {path} is corrupt ({err}). Delete that file to redo step count "
                f"{int(num_inference_steps)} from its start, or run without --resume_from_checkpoint."
            ) from None
        if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
            raise ValueError(
                f"The checkpoint {path} is not a calibration checkpoint (expected an object with \"fingerprint\" and "
                f"\"state\"). Delete that file, or run without --resume_from_checkpoint."
            )
        saved = payload.get("fingerprint")
        if saved != self.fingerprint:
            saved, missing = saved or {}, object()  # a key present in one only differs even when its value is None
            diff = sorted(k for k in set(saved) | set(self.fingerprint)
                          if saved.get(k, missing) != self.fingerprint.get(k, missing))
            raise ValueError(
                f"The checkpoint {path} was written by a calibration with other settings (differs in: "
                f"{', '.join(diff)}). Resume with the same settings, or start afresh in another directory."
            )
        return payload["state"]
