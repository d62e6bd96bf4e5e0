"""Per-step checkpoints of a sequential calibration, written atomically (tmp file + ``os.replace``).

A checkpoint holds the taus decided so far for one step count, their per-step records and a fingerprint of every
setting that changes the result. Cached states are not stored: on resume they are recomputed by running the decided
steps from the same seeded x_T, which reproduces them bit for bit, so a resumed run ends with the same table as an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional


def atomic_write_json(path: str, payload: Any) -> None:
    """Write JSON so that ``path`` holds either the old or the new content, never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
            diff = sorted(k for k in set(saved or {}) | set(self.fingerprint)
                          if (saved or {}).get(k) != self.fingerprint.get(k))
            raise ValueError(
                f"The checkpoint {path} was written by a calibration with other settings (differs in: "
                f"{', '.join(diff)}). Resume with the same settings, or start afresh in another directory."
            )
        return payload["state"]
