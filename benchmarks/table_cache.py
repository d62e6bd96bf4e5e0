"""Calibration tables for the benchmarks: the shared sizes, one `calibrate` call per setting, and a cache of its
tables in ``<out-dir>/tables/`` so that every script of one size reuses the same tables.

The cache key is the SHA-1 (first 12 hex digits) of the JSON of `calibration_settings(...)`: testbed, sampler family
and its scheduler config, NFE, scheduler overrides, custom grid, objective, strategy, optimiser, guidance scale, the
calibration sizes (samples, batch, validation, held-out, Adam steps for the reference optimiser), the seed, and
``code``: a hash of the bytes of the package's ``calibration/``, ``schedulers/``, ``sampling.py``, ``denoiser.py``
and ``table.py`` (`code_fingerprint`). Nothing else enters it: neither the benchmark scripts' own code, nor the
device, nor the time. So a table is recomputed exactly when a setting or one of those package sources changes.
A failed calibration (calibrate's ValueError / NotImplementedError) is cached like a table: same settings and code,
same failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from accelerate import PartialState

from diffusers_timetuner.calibration import CalibrationConfig, calibrate

from .cli_args import log
from .families import FAMILIES, make_scheduler, scheduler_grid, tuned_taus
from .testbeds import Testbed
from .provenance import code_fingerprint, device_name, json_default, utc_now

# The objectives the package offers (diffusers_timetuner.calibration.OBJECTIVES); "default" = calibrate's default
# optimiser (not passed, so the benchmark follows the package's default), "adam" = the paper's reference optimiser.
OBJECTIVES = ("paper", "paper_x0", "teacher_local", "endpoint")
DEFAULT_OPTIMIZER = "default"
REFERENCE_OPTIMIZER = "adam"


def package_default_objective() -> str:
    return CalibrationConfig().objective


# Calibration sizes shared by every script of one size, so that scripts hit the same cached tables.
# num_samples / batch_size: calibration set; validation / heldout: calibrate's guard and held-out report sets;
# adam_steps: mini-batches per step of the reference Adam (the paper's code: 500).
CALIB = {
    "quick": dict(num_samples=16, batch_size=16, validation_samples=8, heldout_samples=8, adam_steps=20),
    "medium": dict(num_samples=128, batch_size=128, validation_samples=32, heldout_samples=64, adam_steps=500),
    "full": dict(num_samples=512, batch_size=512, validation_samples=128, heldout_samples=256, adam_steps=500),
}
# The MNIST UNet costs ~20 ms per sample and evaluation on one CPU thread: the CPU-feasible medium size calibrates
# it on a much smaller set (stated in every table's settings).
# 64 calibration / 32 validation samples: with 16 / 8 the validation guard (2 paired SE) could not tell any table from
# noise and kept tau = t in every MNIST cell.
CALIB_OVERRIDES = {("medium", "mnist"): dict(num_samples=64, batch_size=64, validation_samples=32, heldout_samples=32,
                                             adam_steps=100)}


def calib_for(size: str, testbed: str) -> Dict[str, Any]:
    return CALIB_OVERRIDES.get((size, testbed), CALIB[size])


@dataclass
class Calibration:
    taus: List[float]
    grid: List[float]
    report: Dict[str, Any]
    settings: Dict[str, Any]
    cached: bool
    path: str
    device: str = ""
    created_utc: str = ""

    @property
    def timesteps(self) -> Optional[List[int]]:
        """The custom grid the table was tuned on (sample with ``timesteps=`` it), or None for the family's own."""
        return self.settings.get("custom_grid")

    def scheduler(self, testbed: Testbed, family: str):
        base = make_scheduler(family, testbed.noise_config, **self.settings.get("overrides", {}))
        nfe = self.settings["nfe"]  # the step count (Heun's table holds 2 n - 1 taus for n steps)
        return base.with_tuned_timesteps(nfe, self.taus, grid=self.grid,
                                         info={"objective": self.settings["objective"], "source": "benchmarks"})


def calibration_settings(testbed: Testbed, family: str, nfe: int, *, objective: str, calib: Dict[str, Any],
                         strategy: str = "sequential", optimizer: str = DEFAULT_OPTIMIZER,
                         guidance_scale: float = 1.0, seed: int = 0, overrides: Optional[Dict[str, Any]] = None,
                         timesteps: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Everything that decides a table, as plain JSON: the cache key is its hash (see the module docstring)."""
    return {
        "testbed": testbed.name, "family": family, "family_config": FAMILIES[family].config, "nfe": int(nfe),
        "overrides": dict(overrides or {}), "custom_grid": None if timesteps is None else [int(t) for t in timesteps],
        "objective": objective, "strategy": strategy, "optimizer": optimizer, "guidance_scale": float(guidance_scale),
        "num_samples": int(calib["num_samples"]), "batch_size": int(calib["batch_size"]),
        "validation_samples": int(calib["validation_samples"]), "heldout_samples": int(calib["heldout_samples"]),
        "adam_steps": int(calib["adam_steps"]) if optimizer == REFERENCE_OPTIMIZER else None,
        "seed": int(seed), "code": code_fingerprint(),
    }


def cache_key(settings: Dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


class CalibrationFailed(RuntimeError):
    """`calibrate` raised for these settings (the message is "ErrorType: first line")."""


def get_calibration(testbed: Testbed, family: str, nfe: int, device, *, tables_dir, use_cache: bool = True,
                    **kwargs) -> Calibration:
    """A tuned table for these settings: from the cache, else computed by `calibrate` and cached."""
    settings = calibration_settings(testbed, family, nfe, **kwargs)
    name = f"{testbed.name}_{family}_n{nfe}_{settings['objective']}_{settings['strategy']}_{settings['optimizer']}_" \
           f"g{settings['guidance_scale']:g}_{cache_key(settings)}.json"
    path = Path(tables_dir) / name
    if use_cache and path.exists():
        entry = json.loads(path.read_text())
        if "error" in entry:  # a deterministic failure of these settings and code, cached like a table
            raise CalibrationFailed(entry["error"])
        return Calibration(entry["taus"], entry["grid"], entry["report"], settings, True, str(path),
                           entry.get("device", ""), entry.get("created_utc", ""))
    log(f"calibrate {name[:-5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        taus, grid, report = _run_calibration(testbed, family, nfe, device, settings)
    except (ValueError, NotImplementedError) as err:  # calibrate's own refusals / failures: cache them too
        msg = f"{type(err).__name__}: {str(err).splitlines()[0][:400]}"
        path.write_text(json.dumps({"settings": settings, "error": msg, "device": device_name(device),
                                    "created_utc": utc_now()}, indent=1))
        raise CalibrationFailed(msg) from err
    entry = {"settings": settings, "taus": taus, "grid": grid, "report": report, "device": device_name(device),
             "created_utc": utc_now()}
    path.write_text(json.dumps(entry, indent=1))
    return Calibration(taus, grid, report, settings, False, str(path), entry["device"], entry["created_utc"])


def try_calibration(testbed: Testbed, family: str, nfe: int, device, **kwargs):
    """(Calibration, None), or (None, "ErrorType: message") when `calibrate` raises: a failed calibration is a
    result to report (listed in the JSON and the Markdown), not a reason to lose the rest of the run."""
    try:
        return get_calibration(testbed, family, nfe, device, **kwargs), None
    except Exception as err:  # noqa: BLE001 - reported, see docstring
        msg = str(err) if isinstance(err, CalibrationFailed) else \
            f"{type(err).__name__}: {str(err).splitlines()[0][:400]}"
        log(f"calibration FAILED ({testbed.name} {family} n={nfe} {kwargs.get('objective')}): {msg}")
        return None, msg


def _run_calibration(testbed: Testbed, family: str, nfe: int, device, s: Dict[str, Any]):
    overrides = s.get("overrides", {})
    config = CalibrationConfig(objective=s["objective"], strategy=s["strategy"], guidance_scale=s["guidance_scale"],
                               num_samples=s["num_samples"], batch_size=s["batch_size"], seed=s["seed"],
                               num_validation_samples=s["validation_samples"],
                               num_heldout_samples=s["heldout_samples"], timesteps=s["custom_grid"])
    if s["optimizer"] != DEFAULT_OPTIMIZER:
        config = config.replace(optimizer=s["optimizer"])
        if s["optimizer"] == REFERENCE_OPTIMIZER:
            config = config.replace(adam_steps=s["adam_steps"])
    # Data for the strategies that start from x_0 (sequential Alg. 1, parallel eq. 11): (images, labels) so that a
    # class-conditional model's data trajectories carry their own labels.
    data = (testbed.data, testbed.labels) if testbed.labels is not None else testbed.data
    t0 = time.perf_counter()
    result = calibrate(testbed.model, make_scheduler(family, testbed.noise_config, **overrides), nfe, config,
                       data=data, progress=False, accelerator=_single_process_state(device))
    wall = time.perf_counter() - t0
    taus = tuned_taus(result.scheduler, nfe)
    grid = scheduler_grid(make_scheduler(family, testbed.noise_config, **overrides), nfe, timesteps=s["custom_grid"])
    rep = result.reports[nfe]
    report = report_dict(rep)
    report.pop("steps", None)  # per-step records are long; the summary counts are below
    report.update({"forward_samples": int(rep.forward_samples), "backward_samples": int(rep.backward_samples),
                   "seconds": float(rep.seconds), "wall_time_s": wall,
                   "worse_than_untuned_heldout": bool(rep.worse_than_untuned),
                   "kept_steps": [bool(r.kept) for r in rep.steps],
                   "calibrate_settings": report_dict(result.settings)})
    return taus, grid, report


def _single_process_state(device):
    """calibrate() runs on its accelerator's device (CPU without one): give it a one-process state on `device`."""
    state = PartialState(cpu=torch.device(device).type == "cpu")
    if state.num_processes != 1:
        raise ValueError("the benchmarks calibrate in one process; run them without torchrun/accelerate launch.")
    return state


def report_dict(report) -> Dict[str, Any]:
    """A calibration report (its `to_dict()`, a dataclass or a dict) as plain JSON."""
    if report is None:
        return {}
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    elif dataclasses.is_dataclass(report):
        report = dataclasses.asdict(report)
    return json.loads(json.dumps(report, default=json_default))


def report_count(report: Dict[str, Any], *names: str) -> Optional[float]:
    """First numeric entry of `report` among `names` (searching one nesting level too)."""
    for n in names:
        if isinstance(report.get(n), (int, float)):
            return float(report[n])
    for v in report.values():
        if isinstance(v, dict):
            got = report_count(v, *names)
            if got is not None:
                return got
    return None
