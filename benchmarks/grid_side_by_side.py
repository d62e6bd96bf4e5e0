"""Grid learning side by side: untuned, best hand grid, tau only, grid only, grid + tau, GITS, LD3 and DMN.

Same model, x_T (and class labels), sample count and NFE for every column; every method ends as an integer grid (and,
for tau only / grid + tau / LD3, a tau table) sampled by the package's TimeTuner schedulers, so all columns run the
same solver code. Per cell (testbed, sampler, NFE):

- untuned: the scheduler's default spacing (DDIM "trailing"; DPM-Solver++ and UniPC diffusers' time-uniform
  "linspace", the grid the grid modes start from and guard against);
- best hand grid: quadratic, log-SNR or Karras, whichever has the lowest endpoint L2 to the teacher on a separate
  calibration x_T set (never the evaluation set);
- tau only: ``calibrate(...)`` with the package defaults (the paper's method on the default grid);
- grid only / grid + tau: ``calibrate(..., tune="grid" | "grid+tau")``;
- GITS (ICML 2024, ``peers_grid/gits.py``): DP over a 61-timestamp iPNDM teacher trajectory (one grid per testbed
  and NFE, shared by both samplers);
- LD3 (ICLR 2025, ``peers_grid/ld3.py``): learned grid + decoupled model time (a tau table), trained through a
  continuous-time copy of the sampler against the teacher's final samples, then rounded to integer timesteps;
- DMN (CVPR 2024, ``peers_grid/dmn.py``): data-free, the grid minimising the solver's error bound in log-SNR (no
  network evaluation; DPM-Solver++(2M) weights for DPM-Solver++ and UniPC-2, first-order ones for DDIM).

Quality: exact GMM: FD against exact samples and endpoint L2 to the many-step floor from the same x_T; MNIST UNet:
FD-MNIST and class accuracy. The floor (many-step DDIM, or DPM-Solver++ with --mnist-fd2000, from the same x_T)
gives each cell's gap; "closed" is the share of the gap (untuned -> floor) a method closes. Calibration cost:
network sample-evaluations forward / backward and wall time (teacher samples a method needs included).

Headline cells run first (MNIST DDIM@10, DPM-Solver++@5, GMM DDIM@10); with ``--budget-s`` the rest is listed as
not measured. Finished cells are cached in ``results/grid_side_by_side_cache/`` (one JSON per cell and method), so
separate processes (``--testbeds gmm`` / ``--testbeds mnist``) can run in parallel and a last run assembles them.

With ``--mnist-fd2000`` the MNIST UNet runs at the CPU-feasible FD-MNIST size (``MNIST_FD2000``: 2000 samples, a
DPM-Solver++ 2M 25-step floor, every cell, headline cells first, the peers at the reduced CPU counts of
``--medium``); its cells are cached under their own tag, so the GMM part of a ``--medium`` run is kept.

Usage: python -m benchmarks.grid_side_by_side --quick|--medium|--full [--testbeds gmm mnist] [--mnist-fd2000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from accelerate import PartialState

from diffusers_timetuner import sample
from diffusers_timetuner.calibration import CalibrationConfig, calibrate

from . import grids
from .cli_args import add_common_args, log, setup
from .evaluation import endpoint_l2, fd_pixels, generate, mnist_metrics, seeded_noise
from .families import FAMILIES, make_scheduler, scheduler_grid, tuned_taus
from .peers_grid import dmn, gits, ld3
from .peers_grid.continuous import ContinuousSchedule
from .provenance import code_fingerprint, git_commit, json_default, utc_now
from .table_cache import (
    Calibration,
    calib_for,
    calibration_settings,
    package_default_objective,
    report_count,
    try_calibration,
)
from .testbeds import load_testbed
from .writer import Run, figure, markdown_table, rel_change

NAME = "grid_side_by_side"
METHODS = ("untuned", "hand_grid", "tau", "grid", "grid+tau", "gits", "ld3", "dmn")
RUN_ORDER = ("untuned", "hand_grid", "tau", "dmn", "gits", "ld3", "grid+tau", "grid")  # the costliest last
LABELS = {"untuned": "untuned", "hand_grid": "best hand grid", "tau": "tau only", "grid": "grid only",
          "grid+tau": "grid + tau", "gits": "GITS", "ld3": "LD3", "dmn": "DMN"}
HAND_GRIDS = ("quadratic", "logsnr", "karras")
# Every method of a cell samples (and calibrates) one scheduler: the one calibrate(tune="grid" ...) starts from and
# whose default grid its guard compares against. For DPM-Solver++ that is diffusers' default time-uniform spacing,
# not the benchmarks' log-SNR family setting (use_lu_lambdas refuses custom grids); the log-SNR grid is a hand grid.
SIDE_BY_SIDE_OVERRIDES = {"dpmpp": {"use_lu_lambdas": False}}
HEADLINE = [("mnist", "ddim", 10), ("mnist", "dpmpp", 5), ("gmm", "ddim", 10)]
NFES = [4, 5, 6, 8, 10]
SAMPLERS = ["ddim", "dpmpp", "unipc"]

SIZES = {
    # CI smoke run: the exact model only, one cell, tiny peers
    "quick": dict(
        gmm=dict(n=64, families=["ddim"], nfes=[5], floor_steps=50, select_n=16,
                 gits=dict(num_steps_tea=13, num_warmup=16), ld3=dict(num_train=4, num_valid=4, rounds_v1=1,
                                                                       rounds_v2=1)),
        batch=256),
    # CPU: the exact model in full with the published peer settings; the MNIST UNet only at the two headline cells,
    # on 64 samples, GITS on 8 warm-up samples, LD3 on 6 / 6 samples and 1 + 1 rounds
    "medium": dict(
        gmm=dict(n=2000, families=SAMPLERS, nfes=NFES, floor_steps=1000, select_n=256,
                 gits=dict(num_steps_tea=61, num_warmup=256), ld3=dict(num_train=50, num_valid=50)),
        # (measured here: ~30 ms per sample and evaluation with the machine to itself, ~10x more when shared)
        mnist=dict(n=64, families=SAMPLERS, nfes=NFES, cells=[("ddim", 10), ("dpmpp", 5)], floor_steps=50,
                   select_n=16, gits=dict(num_steps_tea=61, num_warmup=8),
                   ld3=dict(num_train=6, num_valid=6, rounds_v1=1, rounds_v2=1, max_seconds=400),
                   tune_calib=dict(num_samples=16, batch_size=16, validation_samples=8, heldout_samples=8,
                                   teacher_steps=50)),
        batch=500),
    # The published sizes (a GPU): >= 2000 FD-MNIST samples, the peers' own sample counts
    "full": dict(
        gmm=dict(n=10000, families=SAMPLERS, nfes=NFES, floor_steps=1000, select_n=256,
                 gits=dict(num_steps_tea=61, num_warmup=256), ld3=dict(num_train=50, num_valid=50)),
        mnist=dict(n=2000, families=SAMPLERS, nfes=NFES, floor_steps=200, select_n=128,
                   gits=dict(num_steps_tea=61, num_warmup=256), ld3=dict(num_train=50, num_valid=50)),
        batch=2000),
}
# --mnist-fd2000: FD-MNIST on 2000 samples at every cell on a CPU (headline cells first; --cells picks some, so two
# processes can split the cells and share the cache). Floor: DPM-Solver++ 2M at 25 steps
# (second order; 25 rather than 50 steps because the machine is shared: the floor alone is 2000 x 25 network
# evaluations). The peers keep the reduced CPU counts of --medium (GITS 8
# warm-up samples, LD3 6 / 6 samples, 1 + 1 rounds); grid / grid + tau calibrate with the sizes of the DPM-Solver++@5
# grid entries of tuned_schedules/build.py (32 calibration / 32 validation / 64 held-out x_T; the bundled DDIM@10 grid
# tables use 128 validation x_T, which their guard needed to accept the grid), with a 40-step teacher 0.045 from an
# 80-step run (calibration/config.py).
MNIST_FD2000 = dict(n=2000, families=SAMPLERS, nfes=NFES, floor_family="dpmpp",
                    floor_steps=25, select_n=16, gits=dict(num_steps_tea=61, num_warmup=8),
                    ld3=dict(num_train=6, num_valid=6, rounds_v1=1, rounds_v2=1, max_seconds=400),
                    tune_calib=dict(num_samples=32, batch_size=32, validation_samples=32, heldout_samples=64,
                                    teacher_steps=40, grid_search_criterion="log_mean"),
                    cache_tag="fd2000")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--testbeds", nargs="+", default=["gmm", "mnist"], choices=("gmm", "mnist"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--cells", nargs="+", default=None, metavar="TESTBED:SAMPLER@NFE",
                        help="run only these cells (e.g. mnist:dpmpp@5); the others are still assembled from the cache")
    parser.add_argument("--reuse-tables-of-older-code", action="store_true",
                        help="tau only: use a cached calibrate() table with the same settings made by an older package "
                             "code when the current code has none (recorded in the results)")
    parser.add_argument("--mnist-fd2000", action="store_true",
                        help="the MNIST UNet at FD-MNIST on 2000 samples, DPM-Solver++ 2M 25-step floor, every cell "
                             "(MNIST_FD2000)")
    parser.add_argument("--cache-dir", default=None, help="per-cell result cache (default <out-dir>/"
                                                          "grid_side_by_side_cache)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# schedulers: every method ends here
# --------------------------------------------------------------------------------------------------------------
def build_scheduler(family: str, noise_config: Dict, nfe: int, grid: Optional[Sequence[int]] = None,
                    taus: Optional[Sequence[float]] = None, source: str = "") -> Tuple[object, Optional[List[int]]]:
    """(scheduler, timesteps): the package's TimeTuner scheduler of `family` with tau table `taus` (None: untuned)
    and the custom grid to sample it on (``set_timesteps(timesteps=grid)``; None: its default spacing for `nfe`).

    The grid is set once here, so that a grid the scheduler refuses (duplicates, out of range) raises ValueError
    before any sampling."""
    sched = make_scheduler(family, noise_config, **SIDE_BY_SIDE_OVERRIDES.get(family, {}))
    timesteps = None if grid is None else [int(t) for t in grid]
    if taus is not None:
        table_grid = timesteps or [int(t) for t in scheduler_grid(sched, nfe)]
        sched = sched.with_tuned_timesteps(nfe, [float(t) for t in taus], grid=table_grid,
                                           info={"source": source or "benchmarks"})
    if timesteps is not None:
        sched.set_timesteps(timesteps=timesteps)
    return sched, timesteps


def karras_grid(noise_config: Dict, nfe: int) -> List[int]:
    """diffusers' Karras spacing (rho = 7 in sigma, mapped to the nearest training timestep) for this schedule."""
    sched = make_scheduler("dpmpp", noise_config, use_lu_lambdas=False, use_karras_sigmas=True)
    return [int(t) for t in scheduler_grid(sched, nfe)]


def hand_grid(kind: str, noise_config: Dict, nfe: int) -> List[int]:
    if kind == "quadratic":
        return grids.quadratic_grid(nfe, int(noise_config.get("num_train_timesteps", 1000)))
    if kind == "logsnr":
        return grids.logsnr_grid(noise_config, nfe)
    return karras_grid(noise_config, nfe)


# --------------------------------------------------------------------------------------------------------------
# one testbed: evaluation set, floor, calibration set with teacher targets
# --------------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, testbed, cfg, args, device, batch):
        self.tb, self.cfg, self.args, self.device, self.batch = testbed, cfg, args, device, batch
        self.n = cfg["n"]
        self.labels = None if testbed.num_classes is None else testbed.labels_for(self.n, "cpu")["class_labels"]
        self.exact = testbed.exact_sampler(self.n, args.seed + 7) if testbed.exact_sampler is not None else None
        self.schedule = ContinuousSchedule.from_scheduler(make_scheduler("ddim", testbed.noise_config))
        self._floor = None
        self._calib = None

    # network as (x, tau) -> eps for given labels, counted
    def model_fn(self, labels=None):
        den = self.tb.denoiser(1.0)
        cond = None if labels is None else {"class_labels": labels}

        def fn(x, tau):
            return den(x, torch.as_tensor(tau, dtype=torch.float32), cond)

        fn.denoiser = den
        return fn

    def generate(self, sched, nfe, family, n=None, seed=None, timesteps=None):
        """Samples from the evaluation x_T (or `seed`'s); `timesteps`: a custom grid instead of `nfe`'s spacing."""
        return generate(self.tb, sched, None if timesteps is not None else nfe, n or self.n,
                        self.args.seed if seed is None else seed, self.device, batch_size=self.batch, family=family,
                        timesteps=timesteps)

    def metrics(self, samples):
        out = {"fd": fd_pixels(samples, self.exact)} if self.exact is not None else \
            mnist_metrics(samples, self.labels, self.device)
        out["endpoint_l2"] = endpoint_l2(samples, self.floor()["samples"])
        return out

    def floor(self):
        """Many-step DDIM from the evaluation x_T: the reference of every cell."""
        if self._floor is None:
            steps, fam = self.cfg["floor_steps"], self.floor_family
            path = self._sample_cache(f"floor{self._floor_tag()}{steps}_n{self.n}")
            if path.exists():
                self._floor = torch.load(path)
                return self._floor
            log(f"{NAME}: {self.tb.name} floor, {FAMILIES[fam].label} {steps} steps, {self.n} samples")
            t0 = time.perf_counter()
            x = self.generate(make_scheduler(fam, self.tb.noise_config), steps, fam)
            q = fd_pixels(x, self.exact) if self.exact is not None else None
            m = {"fd": q} if q is not None else mnist_metrics(x, self.labels, self.device)
            self._floor = {"samples": x, "metrics": m, "steps": steps, "seconds": time.perf_counter() - t0}
            torch.save(self._floor, path)
        return self._floor

    @property
    def floor_family(self) -> str:
        """The many-step sampler of the floor and of the calibration targets (DDIM unless the size says)."""
        return self.cfg.get("floor_family", "ddim")

    def _floor_tag(self) -> str:
        return "" if self.floor_family == "ddim" else f"-{self.floor_family}"  # DDIM: the older cache names

    def _sample_cache(self, what):
        """Floor and teacher samples are kept (a restart must not pay for them again); not committed."""
        d = Path(self.args.cache_dir_resolved) / "samples"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{_size_tag(self.args, self.cfg)}_{self.tb.name}_seed{self.args.seed}_{what}.pt"

    def calibration_set(self):
        """Calibration x_T (a seed disjoint from the evaluation one), labels and the teacher's final samples."""
        if self._calib is None:
            ld3_cfg = self.cfg["ld3"]
            m = max(self.cfg["select_n"], ld3_cfg["num_train"] + ld3_cfg["num_valid"])
            seed = self.args.seed + 1000
            x_T = seeded_noise(m, self.tb.sample_shape, seed)
            labels = None if self.tb.num_classes is None else self.tb.labels_for(m, "cpu")["class_labels"]
            steps, fam = self.cfg["floor_steps"], self.floor_family
            path = self._sample_cache(f"teacher{self._floor_tag()}{steps}_m{m}")
            if path.exists():
                self._calib = torch.load(path)
                return self._calib
            log(f"{NAME}: {self.tb.name} teacher ({FAMILIES[fam].label} {steps} steps) on {m} calibration samples")
            t0 = time.perf_counter()
            y = self.generate(make_scheduler(fam, self.tb.noise_config), steps, fam, n=m, seed=seed)
            self._calib = {"x_T": x_T, "labels": labels, "target": y, "teacher_steps": steps,
                           "seconds": time.perf_counter() - t0}
            torch.save(self._calib, path)
        return self._calib

    def teacher_cost(self, count):
        c = self.calibration_set()
        return {"forward": count * c["teacher_steps"], "backward": 0,
                "wall_time_s": c["seconds"] * count / c["x_T"].shape[0]}


# --------------------------------------------------------------------------------------------------------------
# methods: each returns {"grid", "taus", "cost": {...}, "notes"} (grid None = default spacing)
# --------------------------------------------------------------------------------------------------------------
def method_untuned(bench, family, nfe, shared):
    return {"grid": None, "taus": None, "cost": {"forward": 0, "backward": 0, "wall_time_s": 0.0}}


def method_hand_grid(bench, family, nfe, shared):
    calib = bench.calibration_set()
    k = bench.cfg["select_n"]
    t0 = time.perf_counter()
    scores = {}
    for kind in HAND_GRIDS:
        try:
            grid = hand_grid(kind, bench.tb.noise_config, nfe)
            sched, timesteps = build_scheduler(family, bench.tb.noise_config, nfe, grid)
        except ValueError as err:  # e.g. a spacing with duplicate timesteps at this NFE
            scores[kind] = {"error": str(err).splitlines()[0]}
            continue
        x = bench.generate(sched, nfe, family, n=k, seed=bench.args.seed + 1000, timesteps=timesteps)
        scores[kind] = {"grid": grid, "calibration_endpoint_l2": endpoint_l2(x, calib["target"][:k])}
    ok = {kk: v for kk, v in scores.items() if "grid" in v}
    best = min(ok, key=lambda kk: ok[kk]["calibration_endpoint_l2"])
    cost = bench.teacher_cost(k)
    cost["forward"] += len(ok) * k * nfe
    cost["wall_time_s"] += time.perf_counter() - t0
    return {"grid": ok[best]["grid"], "taus": None, "cost": cost, "chosen": best, "selection": scores}


def _tau_calibration(bench, family, nfe):
    kwargs = dict(objective=package_default_objective(), calib=calib_for(bench.args.size, bench.tb.name),
                  seed=bench.args.seed, overrides=SIDE_BY_SIDE_OVERRIDES.get(family))
    if bench.args.reuse_tables_of_older_code:
        stale = _older_table(bench, family, nfe, kwargs)
        if stale is not None:
            return stale, None
    return try_calibration(bench.tb, family, nfe, bench.device, tables_dir=bench.args.tables_dir_resolved,
                           use_cache=not bench.args.no_cache, **kwargs)


def _older_table(bench, family, nfe, kwargs):
    """The newest cached calibrate() table with these exact settings made by an older package code (the result says
    so); None when the current code has its own table or none exists."""
    settings = calibration_settings(bench.tb, family, nfe, **kwargs)
    tables = Path(bench.args.tables_dir_resolved)
    found = []
    for path in tables.glob(f"{bench.tb.name}_{family}_n{nfe}_{settings['objective']}_*.json"):
        entry = json.loads(path.read_text())
        old = dict(entry.get("settings", {}))
        if "taus" not in entry or old.get("code") is None:
            continue
        if old["code"] == settings["code"]:
            return None  # the current code's own table: use it through the normal path
        if {k: v for k, v in old.items() if k != "code"} == {k: v for k, v in settings.items() if k != "code"}:
            found.append((entry.get("created_utc", ""), path, entry))
    if not found:
        return None
    _, path, entry = max(found)
    log(f"{NAME}: using {path.name} (calibrate() table of package code {entry['settings']['code']})")
    return Calibration(entry["taus"], entry["grid"], entry["report"], entry["settings"], True, str(path),
                       entry.get("device", ""), entry.get("created_utc", ""))


def method_tau(bench, family, nfe, shared):
    cal, err = _tau_calibration(bench, family, nfe)
    if cal is None:
        return {"error": err}
    rep = cal.report
    return {"grid": None, "taus": cal.taus, "cost": {
        "forward": report_count(rep, "forward_samples"), "backward": report_count(rep, "backward_samples"),
        "wall_time_s": report_count(rep, "wall_time_s")}, "cached_table": cal.cached,
        "calibrate_settings": {"objective": cal.settings["objective"], "num_samples": cal.settings["num_samples"]},
        "table_file": Path(cal.path).name, "table_package_code": cal.settings.get("code")}


def tune_supported() -> bool:
    """Whether the installed calibrate() learns grids (``CalibrationConfig(tune="grid" | "grid+tau")``)."""
    return "tune" in CalibrationConfig.__dataclass_fields__


def tune_method(mode, guard=True):
    """The runner of calibrate(tune=mode) at the cell's sizes; ``guard=False``: the learned grid as the search
    proposed it, unchecked (benchmarks/grid_guard_check.py measures what the guard's refusals cost)."""
    def run(bench, family, nfe, shared):
        c = bench.cfg.get("tune_calib") or calib_for(bench.args.size, bench.tb.name)
        config = CalibrationConfig(num_samples=c["num_samples"], batch_size=c["batch_size"], seed=bench.args.seed,
                                   num_validation_samples=c["validation_samples"],
                                   num_heldout_samples=c["heldout_samples"], teacher_steps=c.get("teacher_steps"))
        config = config.replace(tune=mode, grid_search_criterion=c.get("grid_search_criterion", "auto"), guard=guard)
        data = (bench.tb.data, bench.tb.labels) if bench.tb.labels is not None else bench.tb.data
        t0 = time.perf_counter()
        try:
            base = make_scheduler(family, bench.tb.noise_config, **SIDE_BY_SIDE_OVERRIDES.get(family, {}))
            result = calibrate(bench.tb.model, base, nfe, config, data=data, progress=False,
                               accelerator=PartialState(cpu=bench.device.type == "cpu"))
        except (ValueError, NotImplementedError) as err:
            return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        wall = time.perf_counter() - t0
        sched = result.scheduler  # plain set_timesteps(nfe) samples on its learned grid
        grid = [int(t) for t in scheduler_grid(sched, nfe)]
        rep = result.reports[nfe]
        # grid_tuning: the grid the search proposed and the guard's validation verdicts (what it refused, and why)
        return {"scheduler": sched, "grid": grid, "taus": tuned_taus(sched, nfe), "calibration_sizes": c,
                "cost": {"forward": int(rep.forward_samples), "backward": int(rep.backward_samples),
                         "wall_time_s": wall}, "grid_tuning": rep.grid_tuning,
                "heldout": {k: rep.heldout.get(k) for k in ("num_samples", "metric", "untuned", "tuned",
                                                            "relative_change", "change_se")}}

    return run


def method_gits(bench, family, nfe, shared):
    key = ("gits", nfe)
    if key not in shared:  # one DP grid per testbed and NFE: GITS's grid does not depend on the student solver
        g = bench.cfg["gits"]
        x = seeded_noise(g["num_warmup"], bench.tb.sample_shape, bench.args.seed + 2000)
        labels = None if bench.tb.num_classes is None else bench.tb.labels_for(g["num_warmup"], "cpu")[
            "class_labels"]
        t0 = time.perf_counter()
        out = gits.gits_grid(bench.model_fn(labels), x, nfe, bench.schedule, num_steps_tea=g["num_steps_tea"],
                             batch_size=bench.batch)
        out["cost"] = {"forward": out["teacher_evaluations"], "backward": 0,
                       "wall_time_s": time.perf_counter() - t0}
        out["settings"] = dict(g, coeff=1.15, teacher="iPNDM (order 4)", metric="L2")
        shared[key] = out
    out = shared[key]
    return {"grid": out["grid"], "taus": None, "cost": out["cost"], "cost_shared_with_other_sampler": True,
            "settings": out["settings"], "path": out["path"]}


def method_ld3(bench, family, nfe, shared):
    calib = bench.calibration_set()
    c = dict(bench.cfg["ld3"])
    cfg = ld3.LD3Config(**c)
    ntr, nva = cfg.num_train, cfg.num_valid
    x, y, lab = calib["x_T"], calib["target"], calib["labels"]
    sl = (lambda a, s: None if a is None else a[s])
    res = ld3.train_ld3(bench.model_fn, x[:ntr], y[:ntr], x[ntr:ntr + nva], y[ntr:ntr + nva],
                        nfe, family, bench.schedule, cfg, labels_train=sl(lab, slice(0, ntr)),
                        labels_valid=sl(lab, slice(ntr, ntr + nva)))
    rounded = ld3.round_grid(res.times, bench.schedule.T)
    cost = bench.teacher_cost(ntr + nva)
    cost["forward"] += res.forward_samples
    cost["backward"] += res.backward_samples
    cost["wall_time_s"] += res.seconds
    # how much rounding the grid changed the sampler: validation loss of the continuous vs the rounded grid
    sched, timesteps = build_scheduler(family, bench.tb.noise_config, nfe, rounded["grid"], res.taus, source="LD3")
    rounded_loss = _rounded_valid_loss(bench, sched, timesteps, family, x[ntr:ntr + nva],
                                       sl(lab, slice(ntr, ntr + nva)), y[ntr:ntr + nva])
    return {"grid": rounded["grid"], "taus": res.taus, "cost": cost, "scheduler": sched, "timesteps": timesteps,
            "continuous_times": res.times, "rounding": dict(rounded, valid_loss_continuous=res.valid_loss,
                                                            valid_loss_rounded=rounded_loss),
            "valid_loss_init": res.valid_loss_init, "iterations": res.iterations,
            "stopped_early_for_time": res.stopped_early, "settings": c}


# DMN's solver weights per family: the package's DPM-Solver++(2M) update for the second-order multistep samplers
# (UniPC-2 included: DMN's repository weights a third-order solver, the nearest here is 2M), first order for DDIM
DMN_SOLVER = {"ddim": "ddim", "dpmpp": "dpmpp", "unipc": "dpmpp"}


def method_dmn(bench, family, nfe, shared):
    out = dmn.dmn_grid(bench.schedule, nfe, solver=DMN_SOLVER[family])
    return {"grid": out["grid"], "taus": None, "cost": {"forward": 0, "backward": 0, "wall_time_s": out["seconds"]},
            "settings": out["settings"], "objective": {k: out[k] for k in ("objective_init", "objective",
                                                                          "objective_rounded")}}


@torch.no_grad()
def _rounded_valid_loss(bench, sched, timesteps, family, x_T, labels, target):
    """LD3's validation loss (per-sample pixel MSE to the teacher) of the rounded grid through the package sampler."""
    cond = None if labels is None else {"class_labels": labels.to(bench.device)}
    sched.set_timesteps(timesteps=timesteps, device=bench.device)
    out = sample(bench.tb.denoiser(1.0), sched, x_T.to(bench.device), None, cond, eta=FAMILIES[family].eta)
    return float((out.float().cpu() - target).pow(2).flatten(1).mean(dim=1).mean())


RUNNERS = {"untuned": method_untuned, "hand_grid": method_hand_grid, "tau": method_tau,
           "grid": tune_method("grid"), "grid+tau": tune_method("grid+tau"), "gits": method_gits,
           "ld3": method_ld3, "dmn": method_dmn,
           # not a column: the grid search with the guard off (benchmarks/grid_guard_check.py)
           "grid_unguarded": tune_method("grid", guard=False)}


# --------------------------------------------------------------------------------------------------------------
# cells, cache, assembly
# --------------------------------------------------------------------------------------------------------------
def cell_order(args, sizes):
    cells = [c for c in HEADLINE if c[0] in args.testbeds and c[0] in sizes]
    for tb in args.testbeds:
        if tb not in sizes:
            continue
        for fam in sizes[tb]["families"]:
            for nfe in sorted(sizes[tb]["nfes"], reverse=True):
                if (tb, fam, nfe) not in cells:
                    cells.append((tb, fam, nfe))
    return [c for c in cells if c[1] in sizes[c[0]]["families"] and c[2] in sizes[c[0]]["nfes"]]


def in_size(sizes, cell) -> bool:
    """Whether this size measures `cell` at all (the CPU size runs the MNIST UNet at the headline cells only)."""
    allowed = sizes[cell[0]].get("cells")
    return allowed is None or (cell[1], cell[2]) in allowed


def _peer_fingerprint() -> str:
    h = hashlib.sha1()
    for f in sorted((Path(__file__).parent / "peers_grid").glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _size_tag(args, cfg) -> str:
    """The size part of cache names: "medium", or "medium-fd2000" for the MNIST cells of ``--mnist-fd2000``."""
    return args.size + (f"-{cfg['cache_tag']}" if cfg.get("cache_tag") else "")


def _cell_prefix(args, cell, method) -> str:
    tb, fam, nfe = cell
    return f"{_size_tag(args, args.sizes[tb])}_{tb}_{fam}_n{nfe}_{method.replace('+', '_')}_"


def cache_path(cache_dir: Path, args, cell, method) -> Path:
    """Where a new result of this cell and method goes (the digest names the code that made it)."""
    key = json.dumps({"package": code_fingerprint(), "peers": _peer_fingerprint()}, sort_keys=True)
    return cache_dir / f"{_cell_prefix(args, cell, method)}{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"


def cached_entry(cache_dir: Path, args, cell, method):
    """The newest cached result of this size, seed, cell and method, whatever code made it: each entry records its
    package and peer code fingerprints, shown in the results (``--no-cache`` recomputes)."""
    prefix = _cell_prefix(args, cell, method)
    found = []
    for path in cache_dir.glob(f"{prefix}*.json"):
        digest = path.name[len(prefix):-len(".json")]
        if len(digest) != 10 or not all(ch in "0123456789abcdef" for ch in digest):
            continue  # e.g. "grid_tau_..." when looking for "grid_..."
        entry = json.loads(path.read_text())
        if entry.get("seed", 0) == args.seed:
            found.append((path.stat().st_mtime, path.name, entry))
    return max(found)[2] if found else None


def run_method(bench, cell, method, shared):
    _, family, nfe = cell
    out = RUNNERS[method](bench, family, nfe, shared)
    if "error" in out or "not_measured" in out:
        return {k: v for k, v in out.items() if k in ("error", "not_measured")}
    if "scheduler" in out:  # the method built its own (calibrate's result, LD3's rounded grid)
        sched, timesteps = out.pop("scheduler"), out.pop("timesteps", None)
    else:
        sched, timesteps = build_scheduler(family, bench.tb.noise_config, nfe, out["grid"], out["taus"],
                                           source=method)
    t0 = time.perf_counter()
    x = bench.generate(sched, nfe, family, timesteps=timesteps)
    out["sampling_seconds"] = time.perf_counter() - t0
    out["metrics"] = bench.metrics(x)
    out["grid_used"] = [int(t) for t in scheduler_grid(sched, nfe, timesteps=timesteps)]
    out["taus_used"] = tuned_taus(sched, nfe)
    return out


def measure_and_cache(bench, cache_dir: Path, cell, method, shared) -> Dict:
    """Run one method on one cell; a finished result gets the floor, seed, scheduler config and code it was made with
    and is cached (errors are not: they are re-run next time)."""
    _, family, _ = cell
    t0 = time.perf_counter()
    try:
        entry = run_method(bench, cell, method, shared)
    except Exception as err:  # noqa: BLE001 - a failed method is a result to report, not a lost run
        entry = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
    entry["seconds_total"] = time.perf_counter() - t0
    if "metrics" in entry:
        f = bench.floor()
        entry["floor"] = {"metrics": f["metrics"], "steps": f["steps"], "family": bench.floor_family}
        entry["seed"] = bench.args.seed
        entry["scheduler_config"] = dict(FAMILIES[family].config, **SIDE_BY_SIDE_OVERRIDES.get(family, {}))
        entry["code"] = {"package": code_fingerprint(), "peers": _peer_fingerprint(), "git_commit": git_commit(),
                         "created_utc": utc_now()}
        cache_path(cache_dir, bench.args, cell, method).write_text(json.dumps(entry, indent=1, default=json_default))
    return entry


def gap_share(value, untuned, floor):
    """Share of the untuned -> floor gap closed; None when there is no gap (at small sample counts FD-MNIST's bias
    can put the floor above untuned: then only the endpoint distance is meaningful)."""
    if value is None or untuned is None or floor is None or untuned <= floor:
        return None
    return (untuned - value) / (untuned - floor)


def main(argv=None):
    args = parse_args(argv)
    device = setup(args)
    run = Run(NAME, args, device)
    args.tables_dir_resolved = run.tables_dir
    sizes = dict(SIZES[args.size])
    if args.mnist_fd2000:
        sizes["mnist"] = MNIST_FD2000
    args.sizes = sizes
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.out_dir) / f"{NAME}_cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    args.cache_dir_resolved = str(cache_dir)
    benches, shared, floors = {}, {}, {}
    results = {}
    for cell in cell_order(args, sizes):
        tb_name, family, nfe = cell
        cfg = sizes[tb_name]
        for method in [m for m in RUN_ORDER if m in args.methods]:
            if args.cells and f"{tb_name}:{family}@{nfe}" not in args.cells:
                entry = cached_entry(cache_dir, args, cell, method)
                if entry is not None:
                    results.setdefault(tb_name, {}).setdefault(f"{family}@{nfe}", {})[method] = entry
                    floors.setdefault(tb_name, entry.get("floor"))
                continue
            if not in_size(sizes, cell):
                results.setdefault(tb_name, {}).setdefault(f"{family}@{nfe}", {})[method] = {
                    "not_measured": f"not in the --{args.size} size (CPU time)"}
                continue
            entry = None if args.no_cache else cached_entry(cache_dir, args, cell, method)
            if entry is None:
                if run.out_of_time(f"{tb_name} {family}@{nfe} {LABELS[method]}"):
                    results.setdefault(tb_name, {}).setdefault(f"{family}@{nfe}", {})[method] = {
                        "not_measured": "time budget spent"}
                    continue
                if tb_name not in benches:
                    benches[tb_name] = Bench(load_testbed(tb_name, device), cfg, args, device,
                                             sizes["batch"])
                bench = benches[tb_name]
                log(f"{NAME}: {tb_name} {family}@{nfe} {LABELS[method]}")
                entry = measure_and_cache(bench, cache_dir, cell, method, shared.setdefault(tb_name, {}))
            results.setdefault(tb_name, {}).setdefault(f"{family}@{nfe}", {})[method] = entry
            if "floor" in entry:
                floors[tb_name] = entry["floor"]
    # the gap each method closes, per cell
    for tb_name, cells in results.items():
        for cell_key, methods in cells.items():
            floor = floors.get(tb_name)
            base = methods.get("untuned", {}).get("metrics")
            for m, e in methods.items():
                if "metrics" not in e or base is None or floor is None:
                    continue
                e["gap_closed_fd"] = gap_share(e["metrics"]["fd"], base["fd"], floor["metrics"]["fd"])
                e["gap_closed_endpoint_l2"] = gap_share(e["metrics"]["endpoint_l2"], base["endpoint_l2"], 0.0)
    summary = {"sizes": {k: v for k, v in sizes.items() if k in args.testbeds or k == "batch"},
               "floors": floors, "cells": results, "targets": targets(results, floors),
               "grid_tuning_available": tune_supported()}
    run.write(summary, markdown(summary, args), make_figure(results, floors))


def _fd(results, tb, cell, method):
    e = results.get(tb, {}).get(cell, {}).get(method, {})
    return e.get("metrics", {}).get("fd"), e.get("gap_closed_fd")


def targets(results, floors):
    out = {}
    for cell in ("dpmpp@5", "ddim@10"):
        fd, share = _fd(results, "mnist", cell, "grid+tau")
        out[f"mnist_{cell}_grid+tau_closes_60pct"] = None if share is None else bool(share >= 0.6)
        out[f"mnist_{cell}_grid+tau_gap_closed"] = share
    fd, _ = _fd(results, "gmm", "ddim@10", "grid+tau")
    base, _ = _fd(results, "gmm", "ddim@10", "untuned")
    out["gmm_ddim@10_grid+tau_fd_change"] = rel_change(fd, base)
    out["gmm_ddim@10_grid+tau_fd_50pct_lower"] = None if fd is None or base is None else bool(fd <= 0.5 * base)
    never_worse, wins, ratios, peer_wins, grid_cmp = [], [], [], [], []
    for tb, cells in results.items():
        for cell, m in cells.items():
            gt = m.get("grid+tau", {}).get("metrics", {}).get("fd")
            un = m.get("untuned", {}).get("metrics", {}).get("fd")
            if gt is None or un is None:
                continue
            never_worse.append(gt <= un)
            others = [m[k]["metrics"]["fd"] for k in ("grid", "gits", "ld3", "dmn") if "metrics" in m.get(k, {})]
            wins.append(all(gt < o for o in others))
            peers = [m[k]["metrics"]["fd"] for k in ("gits", "ld3", "dmn") if "metrics" in m.get(k, {})]
            peer_wins.append(all(gt < o for o in peers))
            grid_fd = m.get("grid", {}).get("metrics", {}).get("fd")
            if grid_fd is not None:
                grid_cmp.append("better" if gt < grid_fd else "tied" if gt == grid_fd else "worse")
            tc = m.get("tau", {}).get("cost", {})
            gc = m.get("grid+tau", {}).get("cost", {})
            same_sizes = "calibration_sizes" in m.get("grid+tau", {}) and tb == "gmm"  # MNIST: different sizes
            if tc.get("forward") and gc.get("forward") and same_sizes:
                ratios.append(((gc["forward"] or 0) + 2 * (gc.get("backward") or 0))
                              / ((tc["forward"] or 0) + 2 * (tc.get("backward") or 0)))
    out["grid+tau_never_worse_than_untuned"] = all(never_worse) if never_worse else None
    out["grid+tau_best_of_grid_and_peers_share_of_cells"] = (sum(wins) / len(wins)) if wins else None
    out["grid+tau_better_than_every_peer_share_of_cells"] = (sum(peer_wins) / len(peer_wins)) if peer_wins else None
    # ties: the guard refused the tau step on the learned grid, so grid + tau is the grid-only table
    out["grid+tau_vs_grid_only_cells_better_tied_worse"] = [grid_cmp.count(k) for k in ("better", "tied", "worse")]
    # forward + 2 x backward sample-evaluations, cells where both used the same calibration sizes (the exact model)
    out["grid+tau_over_tau_cost_ratio_max"] = max(ratios) if ratios else None
    return out


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.0f}%" if pct else f"{v:.4g}"


def markdown(summary, args) -> str:
    res, floors = summary["cells"], summary["floors"]
    lines = ["# Grid learning side by side\n",
             "Every column samples through the package's TimeTuner schedulers from the same x_T (and labels). "
             "Cell = FD (share of the untuned -> floor gap closed). 'n/m' = not measured (reason below).\n"]
    lines += headline_lines(summary)
    notes = []
    for tb in res:
        fl = floors.get(tb)
        metric = "FD (pixels, vs exact samples)" if tb == "gmm" else "FD-MNIST"
        size = summary["sizes"].get(tb, {})
        floor_label = FAMILIES[size.get("floor_family", "ddim")].label
        lines.append(f"\n## {tb}: {metric}, {size.get('n')} samples; floor = {floor_label} {size.get('floor_steps')} "
                     "steps"
                     + (f", FD {fl['metrics']['fd']:.4g}" if fl else "") + "\n")
        header = ["cell"] + [LABELS[m] for m in args.methods]
        rows = []
        for cell, ms in res[tb].items():
            row = [cell]
            for m in args.methods:
                e = ms.get(m, {})
                if "metrics" in e:
                    row.append(f"{e['metrics']['fd']:.4g} ({_fmt(e.get('gap_closed_fd'), True)})")
                else:
                    why = e.get("not_measured") or e.get("error") or "not run"
                    notes.append(f"{tb} {cell} {LABELS[m]}: {why}")
                    row.append("n/m")
            rows.append(row)
        lines.append(markdown_table(header, rows))
        lines.append("\nEndpoint L2 to the floor sample (share of the untuned distance removed):\n")
        rows = []
        for cell, ms in res[tb].items():
            rows.append([cell] + [f"{ms[m]['metrics']['endpoint_l2']:.4g} "
                                  f"({_fmt(ms[m].get('gap_closed_endpoint_l2'), True)})"
                                  if "metrics" in ms.get(m, {}) else "n/m" for m in args.methods])
        lines.append(markdown_table(header, rows))
        lines.append("\nCalibration cost: forward / backward sample-evaluations of the network, wall seconds "
                     "(teacher samples included; GITS's grid is shared by both samplers of one NFE):\n")
        rows = []
        for cell, ms in res[tb].items():
            row = [cell]
            for m in args.methods:
                c = ms.get(m, {}).get("cost")
                row.append("-" if not c else f"{_fmt(c.get('forward'))} / {_fmt(c.get('backward'))} / "
                                             f"{_fmt(c.get('wall_time_s'))} s")
            rows.append(row)
        lines.append(markdown_table(header, rows))
        rows = []
        for cell, ms in res[tb].items():
            e = ms.get("ld3", {})
            if "rounding" in e:
                r = e["rounding"]
                rows.append([cell, _fmt(r["max_abs_change"]), _fmt(r["valid_loss_continuous"]),
                             _fmt(r["valid_loss_rounded"]), _fmt(e.get("valid_loss_init"))])
        if rows:
            lines.append("\nLD3 rounding to integer timesteps (validation MSE to the teacher):\n")
            lines.append(markdown_table(["cell", "max grid change", "continuous grid", "rounded grid",
                                                "initial (uniform) grid"], rows))
        rows = [[cell, ms["hand_grid"].get("chosen")] for cell, ms in res[tb].items() if "chosen" in
                ms.get("hand_grid", {})]
        if rows:
            lines.append("\nHand grid chosen on the calibration x_T (endpoint L2 to the teacher):\n")
            lines.append(markdown_table(["cell", "grid"], rows))
    prov = []
    for tb in res:
        for cell, ms in res[tb].items():
            t = ms.get("tau", {})
            if t.get("table_package_code") and t["table_package_code"] != t.get("code", {}).get("package"):
                prov.append(f"- {tb} {cell} tau only: `calibrate` table {t.get('table_file')} made by package code "
                            f"{t['table_package_code']} (same settings; reused with --reuse-tables-of-older-code)")
            for m in ("grid", "grid+tau"):
                if "calibration_sizes" in ms.get(m, {}):
                    prov.append(f"- {tb} {cell} {LABELS[m]}: calibrate(tune=...) sizes {ms[m]['calibration_sizes']}")
    if prov:
        lines.append("\n## Provenance of the calibrations\n\n" + "\n".join(prov) + "\n")
    lines += code_lines(res)
    lines.append("\n## Targets\n")
    lines.append(markdown_table(["target", "value"], [[k, v] for k, v in summary["targets"].items()]))
    if notes:
        lines.append("\n**Not measured / failed:**\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    lines.append("\nLD3 uses the pixel MSE to the teacher (its repository's `L2`); its default LPIPS needs VGG weights "
                 "that cannot be downloaded here. GITS uses the L2 cost of the paper (the repository also offers a "
                 "trajectory-deviation cost).\n")
    return "\n".join(lines)


NOT_RECORDED = "not recorded"


def code_lines(res) -> List[str]:
    """Which package / peer code made the figures (entries come from the per-cell cache, whatever code made them):
    a figure whose code is not the current one may differ on a fresh run."""
    current = {"package": code_fingerprint(), "peers": _peer_fingerprint()}
    made_by: Dict[Tuple[str, str], List[str]] = {}
    for tb, cells in res.items():
        for cell, ms in cells.items():
            for m, e in ms.items():
                if "metrics" in e:
                    code = e.get("code") or {}
                    key = (code.get("package", NOT_RECORDED), code.get("peers", NOT_RECORDED))
                    made_by.setdefault(key, []).append(f"{tb} {cell} {LABELS[m]}")
    out = ["\n## Code that made the figures\n",
           "Figures are read from the per-cell cache (`grid_side_by_side_cache/`), each made by the code it records; "
           "this file was assembled by the current code, package "
           f"`{current['package']}`, peers `{current['peers']}` (fingerprints of the package's calibration / "
           "scheduler / sampling sources and of `peers_grid/`).\n"]
    for (package, peers), entries in sorted(made_by.items()):
        stale = [what for what, fp in (("package", package), ("peers", peers)) if fp != current[what]]
        if not stale:
            verdict = "the current code"
        elif NOT_RECORDED in (package, peers):
            verdict = "code not recorded: a fresh run (`--no-cache`) may give other figures"
        else:
            verdict = f"older {' and '.join(stale)} code: a fresh run (`--no-cache`) may give other figures"
        which = f": {', '.join(entries)}" if len(entries) <= 12 else ""
        out.append(f"- package `{package}`, peers `{peers}` ({verdict}): {len(entries)} figures{which}")
    return out + [""]


def headline_lines(summary) -> List[str]:
    """One computed sentence per headline cell: every measured method's FD and share of the gap closed."""
    res, floors = summary["cells"], summary["floors"]
    out = ["\n## Headline cells\n", "FD (share of the FD gap to the floor closed; share of the endpoint L2 distance "
                                     "to the floor sample removed).\n"]
    for tb, fam, nfe in HEADLINE:
        ms = res.get(tb, {}).get(f"{fam}@{nfe}")
        if not ms or tb not in floors:
            out.append(f"- {tb} {FAMILIES[fam].label}@{nfe}: not measured.")
            continue
        parts = [f"{LABELS[m]} {ms[m]['metrics']['fd']:.4g} ({_fmt(ms[m].get('gap_closed_fd'), True)}; endpoint "
                 f"{_fmt(ms[m].get('gap_closed_endpoint_l2'), True)})" for m in METHODS if "metrics" in ms.get(m, {})]
        missing = [LABELS[m] for m in METHODS if "metrics" not in ms.get(m, {})]
        out.append(f"- {tb} {FAMILIES[fam].label}@{nfe} (floor FD {floors[tb]['metrics']['fd']:.4g}): "
                   + "; ".join(parts) + (f"; not measured: {', '.join(missing)}" if missing else "") + ".")
    return out + [""]


def make_figure(results, floors):
    panels = []
    for tb, cells in results.items():
        for fam in SAMPLERS:
            pts = {}
            for cell, ms in cells.items():
                f, n = cell.split("@")
                if f != fam:
                    continue
                for m, e in ms.items():
                    if "metrics" in e:
                        pts.setdefault(m, []).append((int(n), e["metrics"]["fd"]))
            if pts:
                panels.append((tb, fam, pts))
    if not panels:
        return None
    fig, axes = figure(ncols=len(panels))
    for ax, (tb, fam, pts) in zip(axes[0], panels):
        for m in METHODS:
            if m in pts:
                xs, ys = zip(*sorted(pts[m]))
                ax.plot(xs, ys, marker="o", label=LABELS[m], color=f"C{METHODS.index(m)}")  # same colour per method
        if tb in floors:
            ax.axhline(floors[tb]["metrics"]["fd"], color="k", ls=":", label="floor")
        ax.set_title(f"{tb}: {FAMILIES[fam].label}")
        ax.set_xlabel("NFE")
        ax.set_ylabel("FD" if tb == "gmm" else "FD-MNIST")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return fig


if __name__ == "__main__":
    main()
