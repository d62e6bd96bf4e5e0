"""Reading a tuned scheduler config (plain JSON, no torch) and the held-out measurement it records."""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..table import HELD_OUT_KEY, HeldOutResult

SCHEDULER_SUBFOLDER = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
REPORT_NAME = "report.json"
PLOT_NAME = "calibration.png"
PROVENANCE_NAME = "PROVENANCE.md"
INDEX_NAME = "README.md"
PAPER_URL = (
    "https://openaccess.thecvf.com/content/CVPR2024/html/"
    "Xia_Towards_More_Accurate_Diffusion_Model_Acceleration_with_A_Timestep_Tuner_CVPR_2024_paper.html"
)
# Model ids the calibration records for the testbed models shipped inside this package; they are not Hub repos.
BUNDLED_MODEL_PREFIX = "diffusers-timetuner/bundled-"
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_RE = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


def read_tuned_config(path: str | os.PathLike) -> dict:
    """Read a `scheduler_config.json` (a file or a folder holding one) and check it carries a TimeTuner table."""
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULER_CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"No {SCHEDULER_CONFIG_NAME} at {path}: pass a calibration output folder or a scheduler folder."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run the calibration to rewrite it.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object: it is not a scheduler config.")
    if not config.get("_class_name"):
        raise ValueError(f"{path} has no `_class_name`: it is not a diffusers scheduler config.")
    if not config.get("tuned_timesteps"):
        raise ValueError(
            f"{path} has no `tuned_timesteps` table: it is an untuned scheduler config. Calibrate first "
            "(timetuner-calibrate ...) and push/load the folder it writes."
        )
    return config


def _step_counts(config: dict) -> list[int]:
    return sorted(int(n) for n in config.get("tuned_timesteps") or {})


def _first_info(config: dict) -> dict:
    infos = config.get("tuning_info") or {}
    return next((infos[k] for k in sorted(infos, key=int) if isinstance(infos[k], dict)), {})


def resolve_scheduler_class(class_name: str):
    """The scheduler class named by a config's `_class_name`: TimeTuner classes first, then diffusers."""
    for module_name in ("diffusers_timetuner.schedulers", "diffusers"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, class_name, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"Unknown scheduler class {class_name!r} in the tuned config: expected a TimeTuner*Scheduler from "
        "diffusers_timetuner.schedulers (upgrade diffusers-timetuner?) or pass `scheduler_class=` explicitly."
    )


def recorded_held_out(info: Any) -> HeldOutResult | None:
    """The held-out measurement calibration recorded in one `tuning_info[n]` (key `heldout`), or None: the one
    place the hub reads it."""
    return HeldOutResult.from_json(info.get(HELD_OUT_KEY)) if isinstance(info, dict) else None


def worse_than_untuned(config: dict) -> list[int]:
    """Step counts whose recorded held-out error is higher with the table than without it."""
    worse = []
    for n in _step_counts(config):
        held = recorded_held_out((config.get("tuning_info") or {}).get(str(n)) or {})
        if held is not None and held.worse_than_untuned:
            worse.append(n)
    return worse


def _fmt_held_out(held: HeldOutResult | None) -> str:
    if held is None:
        return ""
    metric, untuned, tuned = held.metric, held.untuned, held.tuned
    change = f" ({100.0 * (tuned - untuned) / untuned:+.1f}%)" if untuned else ""
    return f"{metric}: {untuned:.4g} -> {tuned:.4g}{change}"
