"""Shared plumbing of the benchmark scripts: the one adapter between the benchmarks and the package.

Every call into ``diffusers_timetuner`` (testbeds, metrics, schedulers, calibration, the sampling loop) goes through
this module, so a renamed entry point is a one-line fix here. It also holds what every script shares: command line
(``--quick`` / ``--medium`` / ``--full``, ``--device``), seeded noise, batched sampling, the calibration-table cache
(``benchmarks/results/tables/``, keyed by every setting that changes a table) and the writer of
``<name>.json`` / ``<name>.md`` / ``<name>.png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
try:  # pip-installed, or on PYTHONPATH
    import diffusers_timetuner  # noqa: F401
except ImportError:  # a plain checkout: use its src/
    sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
SIZE_NAMES = ("quick", "medium", "full")
_T0 = time.time()


# ----------------------------------------------------------------------------------------------------------------
# command line, device, logging
# ----------------------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="tiny sizes (CI smoke run)")
    size.add_argument("--medium", dest="size", action="store_const", const="medium", help="CPU-feasible sizes")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="the published sizes (GPU)")
    parser.set_defaults(size="quick")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR), help="where <name>.json/.md/.png are written")
    parser.add_argument("--tables-dir", default=None, help="calibration-table cache (default <out-dir>/tables)")
    parser.add_argument("--no-cache", action="store_true", help="recompute calibration tables even if cached")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of this script (run_all splits its own); work left when it runs out "
                             "is skipped and listed as such in the JSON (default: no limit)")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu.")
    return torch.device(name)


def setup(args) -> torch.device:
    """Apply --threads / --device and GPU speed settings; return the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    METRIC_DEVICE["device"] = device.type
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return device


def log(msg: str) -> None:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp} +{time.time() - _T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# package adapter: every import of diffusers_timetuner lives below
# ----------------------------------------------------------------------------------------------------------------
def _tt():
    import diffusers_timetuner as package

    return package


def sampling_module():
    from diffusers_timetuner import sampling

    return sampling


def denoiser_class():
    from diffusers_timetuner.denoiser import Denoiser

    return Denoiser


def scheduler_classes() -> Dict[str, type]:
    from diffusers_timetuner import schedulers as s

    return {
        "ddim": s.TimeTunerDDIMScheduler,
        "ddpm": s.TimeTunerDDPMScheduler,
        "dpm2": s.TimeTunerDPMSolverSinglestepScheduler,
        "dpmpp": s.TimeTunerDPMSolverScheduler,
    }


def calibrate_fn():
    from diffusers_timetuner.calibration import calibrate

    return calibrate


def metrics_module():
    from diffusers_timetuner import metrics

    return metrics


# ----------------------------------------------------------------------------------------------------------------
# sampler families
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    key: str
    label: str
    config: Dict[str, Any]  # scheduler config on top of the model's noise schedule
    eta: Optional[float] = None  # DDIM eta passed to step
    stochastic: bool = False  # needs a generator in step


# Grids: DDIM / DDPM on the uniform grid that starts at T-1 ("trailing"), DPM-Solver++ on the log-SNR-uniform grid
# (use_lu_lambdas, the DPM-Solver paper's choice), DPM-Solver-2 (singlestep, noise prediction, order 2) on diffusers'
# default time-uniform grid (the singlestep scheduler has no log-SNR option; trajectory_error.py covers that grid).
FAMILIES: Dict[str, Family] = {
    "ddim": Family("ddim", "DDIM", {"timestep_spacing": "trailing", "clip_sample": False}, eta=0.0),
    "ddpm": Family("ddpm", "DDPM (eta=1)", {"timestep_spacing": "trailing", "clip_sample": False}, stochastic=True),
    # lower_order_final=True: diffusers forces it for odd n anyway; for even n without it the last second-order step
    # into sigma_min is unstable with noise prediction (exact model: FD 112 at NFE 4, 22.7 at NFE 6, vs 2.1 / 0.74).
    "dpm2": Family(
        "dpm2", "DPM-Solver-2",
        {"solver_order": 2, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
         "lower_order_final": True},
    ),
    "dpmpp": Family("dpmpp", "DPM-Solver++(2M)", {"solver_order": 2, "algorithm_type": "dpmsolver++",
                                                  "use_lu_lambdas": True}),
}
NOISE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def make_scheduler(family: str, noise_config: Dict[str, Any], **overrides):
    """An untuned TimeTuner scheduler of `family` on the model's noise schedule (bit-for-bit its diffusers parent)."""
    cls = scheduler_classes()[family]
    config = {k: v for k, v in noise_config.items() if k in NOISE_KEYS and v is not None}
    config.update(FAMILIES[family].config)
    config.update(overrides)
    return cls(**config)


class _FixedGrid:
    """Mixin: ``set_timesteps(n)`` takes the custom grid FIXED_GRIDS[n] (e.g. the paper's quadratic or log-SNR grid
    where the scheduler config has no such option) and the parent's spacing for any other n (e.g. calibrate's
    many-step teacher). FIXED_GRIDS is a class attribute, so ``from_config`` / ``with_tuned_timesteps`` (which
    calibrate uses) keep it: calibration and sampling then run on exactly that grid."""

    FIXED_GRIDS: Dict[int, List[int]] = {}

    def set_timesteps(self, num_inference_steps=None, device=None, *args, timesteps=None, **kwargs):
        grid = self.FIXED_GRIDS.get(num_inference_steps) if timesteps is None else None
        if grid is not None:
            return super().set_timesteps(None, device, *args, timesteps=list(grid), **kwargs)
        return super().set_timesteps(num_inference_steps, device, *args, timesteps=timesteps, **kwargs)


def make_fixed_grid_scheduler(family: str, noise_config: Dict[str, Any], grid: Sequence[int], **overrides):
    """An untuned TimeTuner scheduler of `family` whose `set_timesteps(len(grid))` uses `grid`."""
    base = scheduler_classes()[family]
    grid = [int(t) for t in grid]
    cls = type(f"{base.__name__}FixedGrid", (_FixedGrid, base), {"FIXED_GRIDS": {len(grid): grid}})
    config = {k: v for k, v in noise_config.items() if k in NOISE_KEYS and v is not None}
    config.update(FAMILIES[family].config)
    config.update(overrides)
    return cls(**config)


def scheduler_grid(scheduler, nfe: int, device="cpu") -> List[float]:
    scheduler.set_timesteps(nfe, device=device)
    return [float(t) for t in sampling_module().grid_timesteps(scheduler).cpu()]


def tuned_taus(scheduler, nfe: int) -> Optional[List[float]]:
    table = (scheduler.config.get("tuned_timesteps") or {}).get(str(nfe))
    return None if table is None else [float(t) for t in table]


# ----------------------------------------------------------------------------------------------------------------
# testbeds
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Testbed:
    """A model plus what the benchmarks need around it.

    model: the network given to `calibrate` and wrapped by `denoiser(guidance)`; sample_shape: (C, H, W);
    noise_config: the noise schedule (diffusers scheduler config); data/labels: real samples for calibration
    objectives that need data; num_classes: None for unconditional models; null_label: CFG null class.
    """

    name: str
    model: Any
    sample_shape: tuple
    noise_config: Dict[str, Any]
    data: torch.Tensor
    labels: Optional[torch.Tensor] = None
    num_classes: Optional[int] = None
    null_label: Optional[int] = None
    pipeline: Any = None
    exact_sampler: Optional[Callable[[int, int], torch.Tensor]] = None  # (n, seed) -> exact samples (GMM only)
    extra: Dict[str, Any] = field(default_factory=dict)

    def denoiser(self, guidance_scale: float = 1.0):
        Den = denoiser_class()
        if self.num_classes is None or guidance_scale == 1.0:
            return Den(self.model, guidance_scale=guidance_scale)
        return Den(self.model, guidance_scale=guidance_scale, null_class_label=self.null_label)

    def labels_for(self, n: int, device) -> Optional[Dict[str, torch.Tensor]]:
        """Class labels 0..9 in turn (balanced) for n samples; None for unconditional models."""
        if self.num_classes is None:
            return None
        return {"class_labels": (torch.arange(n) % self.num_classes).to(device)}


_TESTBED_CACHE: Dict[tuple, Testbed] = {}


def load_testbed(name: str, device: torch.device) -> Testbed:
    key = (name, str(device))
    if key not in _TESTBED_CACHE:
        _TESTBED_CACHE[key] = {"gmm": _load_gmm, "mnist": _load_mnist}[name](device)
    return _TESTBED_CACHE[key]


def _load_gmm(device) -> Testbed:
    from diffusers_timetuner.testbeds import load_gmm_model

    gmm = load_gmm_model().to(device)
    c = gmm.config
    noise_config = {k: c[k] for k in NOISE_KEYS if k in c}

    def exact(n: int, seed: int) -> torch.Tensor:
        return gmm.sample_data(n, generator=torch.Generator().manual_seed(seed)).float().cpu()

    data = exact(2048, 12345)  # calibration data x_0 (a draw disjoint from the evaluation draws)
    return Testbed("gmm", gmm, tuple(data.shape[1:]), noise_config, data, exact_sampler=exact)


def _load_mnist(device) -> Testbed:
    from diffusers_timetuner.testbeds import load_mnist_pipeline
    from diffusers_timetuner.testbeds.data import load_mnist

    pipe = load_mnist_pipeline(device)
    unet = pipe.unet.eval().requires_grad_(False)
    images, labels = load_mnist("train")  # calibration data: the training split (FD-MNIST uses the held-out one)
    size = unet.config.sample_size
    if images.shape[-1] != size:
        raise ValueError(f"the MNIST model expects {size}x{size} images, the data are {images.shape[-1]}x"
                         f"{images.shape[-1]}")
    n_cls = int(unet.config.num_class_embeds) - 1
    return Testbed(
        "mnist", unet, (unet.config.in_channels, size, size), dict(pipe.scheduler.config), images, labels,
        num_classes=n_cls, null_label=n_cls, pipeline=pipe,
    )


# ----------------------------------------------------------------------------------------------------------------
# seeded noise and batched sampling
# ----------------------------------------------------------------------------------------------------------------
def seeded_noise(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """x_T for samples 0..n-1 from one CPU generator: identical on every device and for every sampler."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(
    testbed: Testbed,
    scheduler,
    nfe: Optional[int],
    n: int,
    seed: int,
    device,
    *,
    guidance_scale: float = 1.0,
    batch_size: int = 1000,
    family: Optional[str] = None,
    timesteps: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """n samples (on CPU, float32) with the shared sampling loop; batch b uses noise rows [b*B, (b+1)*B).

    `timesteps` sets a custom grid instead of `nfe`. Stochastic samplers (DDPM) draw their step noise from a CPU
    generator seeded with seed + 1 + batch index, so results do not depend on the device.
    """
    sampling = sampling_module()
    fam = FAMILIES.get(family) if family else None
    noise = seeded_noise(n, testbed.sample_shape, seed)
    cond_all = testbed.labels_for(n, "cpu")
    den = testbed.denoiser(guidance_scale)
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        x_T = noise[start:start + batch_size].to(device)
        cond = None if cond_all is None else {k: v[start:start + batch_size].to(device) for k, v in cond_all.items()}
        gen = torch.Generator().manual_seed(seed + 1 + b) if fam is not None and fam.stochastic else None
        steps = nfe
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=list(timesteps), device=device)
            steps = None
        x = sampling.sample(den, scheduler, x_T, steps, cond, eta=fam.eta if fam else None, generator=gen)
        out.append(x.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def trajectory(testbed: Testbed, scheduler, nfe: Optional[int], noise: torch.Tensor, device, *,
               timesteps: Optional[Sequence[int]] = None, family: Optional[str] = None,
               guidance_scale: float = 1.0) -> tuple:
    """(states [x_{t_K}, ..., x_0] on CPU, grid times [t_K, ..., t_1, -1]) from the shared loop."""
    sampling = sampling_module()
    fam = FAMILIES.get(family) if family else None
    cond_all = testbed.labels_for(noise.shape[0], device)
    steps = nfe
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
        steps = None
    states = sampling.sample_trajectory(testbed.denoiser(guidance_scale), scheduler, noise.to(device), steps, cond_all,
                                        eta=fam.eta if fam else None)
    grid = [float(t) for t in sampling.grid_timesteps(scheduler).cpu()]
    return [s.float().cpu() for s in states], grid + [-1.0]


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------
def fd_pixels(samples: torch.Tensor, reference: torch.Tensor) -> float:
    return float(metrics_module().pixel_frechet_distance(samples, reference))


METRIC_DEVICE = {"device": "cpu"}  # set by setup(): where the FD-MNIST classifier runs


def mnist_metrics(samples: torch.Tensor, labels: Optional[torch.Tensor]) -> Dict[str, float]:
    """FD-MNIST (vs the 1000 held-out digits) and class accuracy from one pass of the third-party classifier."""
    from diffusers_timetuner.testbeds.mnist import classifier as m
    feats, preds = m.classifier_outputs(samples, device=METRIC_DEVICE["device"])
    # held-out digits at the samples' resolution (16x16 for the flow-matching testbed)
    fd = m.frechet_distance(*m.feature_statistics(feats), *m.heldout_mnist_statistics(int(samples.shape[-1])))
    out = {"fd": float(fd)}
    if labels is not None:
        out["accuracy"] = float((preds == labels.cpu()).double().mean())
    return out


def endpoint_l2(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Batch mean of the per-sample L2 distance (same x_T, same row order)."""
    return float((samples.double() - reference.double()).flatten(1).norm(dim=1).mean())


# ----------------------------------------------------------------------------------------------------------------
# calibration with a shared, settings-keyed cache
# ----------------------------------------------------------------------------------------------------------------
# The objectives the package offers (diffusers_timetuner.calibration.OBJECTIVES); "default" = calibrate's default
# optimiser (not passed, so the benchmark follows the package's default), "adam" = the paper's reference optimiser.
OBJECTIVES = ("paper", "paper_x0", "teacher_local", "endpoint")
DEFAULT_OPTIMIZER = "default"
REFERENCE_OPTIMIZER = "adam"


def package_objectives() -> List[str]:
    from diffusers_timetuner.calibration import OBJECTIVES as objs

    return list(objs)


def package_default_objective() -> str:
    from diffusers_timetuner.calibration import CalibrationConfig

    return CalibrationConfig().objective


def _code_fingerprint() -> str:
    """Hash of the imported package's calibration, scheduler and sampling sources: a change there invalidates the
    cached tables."""
    h = hashlib.sha1()
    base = Path(_tt().__file__).resolve().parent
    for sub in ("calibration", "schedulers", "sampling.py", "denoiser.py", "table.py"):
        p = base / sub
        files = sorted(p.rglob("*.py")) if p.is_dir() else ([p] if p.exists() else [])
        for f in files:
            h.update(f.read_bytes())
    return h.hexdigest()[:10]


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

    def scheduler(self, testbed: Testbed, family: str):
        base = _base_scheduler(testbed, family, self.settings)
        nfe = len(self.taus)
        return base.with_tuned_timesteps(nfe, self.taus, grid=self.grid,
                                         info={"objective": self.settings["objective"], "source": "benchmarks"})


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


def calibration_settings(testbed: Testbed, family: str, nfe: int, *, objective: str, calib: Dict[str, Any],
                         strategy: str = "sequential", optimizer: str = DEFAULT_OPTIMIZER,
                         guidance_scale: float = 1.0, seed: int = 0, overrides: Optional[Dict[str, Any]] = None,
                         timesteps: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    return {
        "testbed": testbed.name, "family": family, "family_config": FAMILIES[family].config, "nfe": int(nfe),
        "overrides": dict(overrides or {}), "custom_grid": None if timesteps is None else [int(t) for t in timesteps],
        "objective": objective, "strategy": strategy, "optimizer": optimizer, "guidance_scale": float(guidance_scale),
        "num_samples": int(calib["num_samples"]), "batch_size": int(calib["batch_size"]),
        "validation_samples": int(calib["validation_samples"]), "heldout_samples": int(calib["heldout_samples"]),
        "adam_steps": int(calib["adam_steps"]) if optimizer == REFERENCE_OPTIMIZER else None,
        "seed": int(seed), "code": _code_fingerprint(),
    }


def get_calibration(testbed: Testbed, family: str, nfe: int, device, *, tables_dir, use_cache: bool = True,
                    **kwargs) -> Calibration:
    """A tuned table for these settings: from the cache, else computed by `calibrate` and cached."""
    settings = calibration_settings(testbed, family, nfe, **kwargs)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{testbed.name}_{family}_n{nfe}_{settings['objective']}_{settings['strategy']}_{settings['optimizer']}_" \
           f"g{settings['guidance_scale']:g}_{key}.json"
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
                                    "created_utc": _utc_now()}, indent=1))
        raise CalibrationFailed(msg) from err
    entry = {"settings": settings, "taus": taus, "grid": grid, "report": report, "device": device_name(device),
             "created_utc": _utc_now()}
    path.write_text(json.dumps(entry, indent=1))
    return Calibration(taus, grid, report, settings, False, str(path), entry["device"], entry["created_utc"])


def _base_scheduler(testbed: Testbed, family: str, settings: Dict[str, Any]):
    if settings.get("custom_grid") is not None:
        return make_fixed_grid_scheduler(family, testbed.noise_config, settings["custom_grid"],
                                         **settings.get("overrides", {}))
    return make_scheduler(family, testbed.noise_config, **settings.get("overrides", {}))


class CalibrationFailed(RuntimeError):
    """`calibrate` raised for these settings (the message is "ErrorType: first line")."""


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
    calibrate = calibrate_fn()
    scheduler = _base_scheduler(testbed, family, s)
    from diffusers_timetuner.calibration import CalibrationConfig

    config = CalibrationConfig(objective=s["objective"], strategy=s["strategy"], guidance_scale=s["guidance_scale"],
                               num_samples=s["num_samples"], batch_size=s["batch_size"], seed=s["seed"],
                               num_validation_samples=s["validation_samples"],
                               num_heldout_samples=s["heldout_samples"])
    if s["optimizer"] != DEFAULT_OPTIMIZER:
        config = config.replace(optimizer=s["optimizer"])
        if s["optimizer"] == REFERENCE_OPTIMIZER:
            config = config.replace(adam_steps=s["adam_steps"])
    kwargs = dict(config=config, progress=False, accelerator=_single_process_state(device))
    # Data for the strategies that start from x_0 (sequential Alg. 1, parallel eq. 11): (images, labels) so that a
    # class-conditional model's data trajectories carry their own labels.
    kwargs["data"] = (testbed.data, testbed.labels) if testbed.labels is not None else testbed.data
    t0 = time.perf_counter()
    result = calibrate(testbed.model, scheduler, nfe, **kwargs)
    wall = time.perf_counter() - t0
    taus = tuned_taus(result.scheduler, nfe)
    grid = scheduler_grid(_base_scheduler(testbed, family, s), nfe)
    rep = result.reports[nfe]
    report = _report_dict(rep)
    report.pop("steps", None)  # per-step records are long; the summary counts are below
    report.update({"forward_samples": int(rep.forward_samples), "backward_samples": int(rep.backward_samples),
                   "seconds": float(rep.seconds), "wall_time_s": wall,
                   "worse_than_untuned_heldout": bool(rep.worse_than_untuned),
                   "kept_steps": [bool(r.kept) for r in rep.steps],
                   "calibrate_settings": _report_dict(getattr(result, "settings", {}))})
    return taus, grid, report


def _single_process_state(device):
    """calibrate() runs on its accelerator's device (CPU without one): give it a one-process state on `device`."""
    from accelerate import PartialState

    state = PartialState(cpu=torch.device(device).type == "cpu")
    if state.num_processes != 1:
        raise ValueError("the benchmarks calibrate in one process; run them without torchrun/accelerate launch.")
    return state


def _report_dict(report) -> Dict[str, Any]:
    """The calibration report as plain JSON (dataclass, dict or object with attributes)."""
    if report is None:
        return {}
    if hasattr(report, "to_dict"):
        report = report.to_dict()
    elif hasattr(report, "__dataclass_fields__"):
        import dataclasses

        report = dataclasses.asdict(report)
    elif not isinstance(report, dict):
        report = {k: v for k, v in vars(report).items() if not k.startswith("_")}
    return json.loads(json.dumps(report, default=_json_default))


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


# ----------------------------------------------------------------------------------------------------------------
# results: JSON + Markdown + PNG
# ----------------------------------------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _utc_now() -> str:
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
    try:
        out["diffusers_timetuner"] = _tt().__version__
    except Exception:  # noqa: BLE001
        out["diffusers_timetuner"] = "not importable"
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
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)


class Run:
    """Collects one script's figures and writes <name>.json, <name>.md and (optionally) <name>.png.

    Also the time budget: `out_of_time()` is True once `--budget-s` seconds have passed since the start; scripts then
    skip the remaining work items and record them in `skipped` (the JSON says what was not measured, and why).
    """

    def __init__(self, name: str, args, device):
        self.name, self.args, self.device = name, args, device
        self.t0 = time.perf_counter()
        self.budget_s = getattr(args, "budget_s", None)
        self.skipped: List[str] = []
        self.meta = {
            "name": name, "command": command_line(), "size": args.size, "seed": args.seed,
            "device": device_name(device), "versions": versions(), "git_commit": git_commit(),
            "package_path": str(Path(_tt().__file__).resolve().parent), "code_fingerprint": _code_fingerprint(),
            "started_utc": _utc_now(),
        }
        self.out_dir = Path(args.out_dir)
        self.tables_dir = Path(args.tables_dir) if args.tables_dir else self.out_dir / "tables"

    def out_of_time(self, what: str = "") -> bool:
        """True (and `what` recorded as skipped) when the budget is spent."""
        if self.budget_s is None or time.perf_counter() - self.t0 < self.budget_s:
            return False
        if what:
            self.skipped.append(what)
            log(f"{self.name}: budget spent, skipping {what}")
        return True

    def write(self, results: Dict[str, Any], markdown: str, figure=None) -> Dict[str, Any]:
        payload = dict(self.meta)
        payload["wall_time_s"] = time.perf_counter() - self.t0
        payload["budget_s"] = self.budget_s
        payload["skipped_for_budget"] = self.skipped
        if self.skipped:
            markdown += (f"\n**Not measured (time budget of {self.budget_s:.0f} s spent):** "
                         + "; ".join(self.skipped) + "\n")
        payload["results"] = results
        check_finite(results, self.name)
        text = json.dumps(payload, indent=1, default=_json_default, allow_nan=False)
        (self.out_dir / f"{self.name}.json").write_text(text + "\n")
        header = (f"<!-- generated by benchmarks/{self.name}.py; do not edit -->\n\n"
                  f"Command: `{payload['command']}`  \nDevice: {payload['device']}; size: {payload['size']}; "
                  f"wall time {payload['wall_time_s']:.1f} s; commit {payload['git_commit'][:12]}\n\n")
        (self.out_dir / f"{self.name}.md").write_text(header + markdown.rstrip() + "\n")
        if figure is not None:
            figure.savefig(self.out_dir / f"{self.name}.png", dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(figure)
        log(f"{self.name}: wrote {self.out_dir / self.name}.json/.md" + ("/.png" if figure is not None else ""))
        return payload


def check_finite(obj, where: str) -> None:
    """Refuse to write NaN/inf figures (a broken run must not publish)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where}: non-finite figure {obj}; not writing results.")
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")  # a literal | would split the cell

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rel_change(new: Optional[float], old: Optional[float]) -> Optional[float]:
    if new is None or old is None or old == 0:
        return None
    return (new - old) / old


def figure(ncols: int = 1, nrows: int = 1, size=(5.0, 3.6)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes
