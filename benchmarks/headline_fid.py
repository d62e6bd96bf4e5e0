"""The headline cells in the field's units: FD-MNIST, class accuracy, Inception FID, sFID and improved precision /
recall (k = 3), untuned vs tuned vs a many-step floor, from the same x_T and labels, with sample counts.

Cells (each: untuned, the tuned table, any ``--tables`` extra, and the floor shared by the cells of one model):
- ``mnist_ddim_10`` and ``mnist_dpmpp_5``: the bundled 28x28 MNIST UNet (epsilon prediction), DDIM@10 and
  DPM-Solver++(2M)@5 (`families.FAMILIES`); floor: DPM-Solver++(2M) at 25 (--medium) or 50 (--full) steps, the
  calibration teacher's sampler.
- ``flow_euler_10``: the bundled 16x16 flow-matching MNIST UNet, FlowMatchEuler@10 vs the bundled table
  ``mnist-flow-euler-10-g1``; floor: Euler at 100 steps (as `flow_mnist.py`).

The tuned table of a cell is chosen by a rule fixed before any of these metrics is seen (`default_table`) and
recorded with its provenance: DDIM@10 the published-size (GPU) table of `results/gpu_full/tables/` with the lowest
held-out endpoint error that `calibrate` itself recorded; DPM-Solver++@5 (no published-size table) a `table_cache`
calibration at this size's calibration sizes; flow the bundled table.

References: the 1000 held-out real digits (never trained on; the FD-MNIST reference), at 16x16 for the flow model
(area-downsampled as its training data). The real training digits (as many as samples, at most 4000, balanced
over the classes) give each metric's real-data level.

Every set (samples, classifier figures, Inception features) is cached under ``<out-dir>/headline_fid_cache/``,
keyed by cell, method, table hash, count and seed, so a crash or a later added table costs only its own set.
The results are rewritten after every set, so a run stopped early still leaves its figures (missing ones listed as
"not measured").

The file stays whole (one script per question, as the other benchmarks): table choice, the set cache, the Inception
work shared between processes and the report all serve this one table and share its set keys.

Usage: OMP_NUM_THREADS=2 python -m benchmarks.headline_fid --medium --threads 2
       python -m benchmarks.headline_fid --medium --tables mnist_ddim_10=path/to/table.json   (adds a method)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import cli_args, writer
from .evaluation import generate, mnist_metrics
from .families import FAMILIES

NAME = "headline_fid"
CACHE = "headline_fid_cache"
BUNDLED_FLOW_TABLE = "mnist-flow-euler-10-g1"
GPU_TABLES = cli_args.RESULTS_DIR / "gpu_full" / "tables"
SIZES = {
    # CI smoke: a handful of samples and references (k = 3 needs more than 3 of each); no real-data level.
    "quick": dict(n=4, n_reference=4, eps_floor_steps=8, flow_floor_steps=8, real_level=False, batch=4,
                  grid_columns=4, calib_size="quick"),
    # The eps floor at 25 DPM-Solver++(2M) steps (the calibration teacher's sampler) rather than 50: on 2 shared CPU
    # cores a 50-step set costs more than the four few-step sets together. --full keeps 50.
    "medium": dict(n=2000, n_reference=None, eps_floor_steps=25, flow_floor_steps=100, real_level=True, batch=250,
                   grid_columns=10, calib_size="medium"),
    "full": dict(n=5000, n_reference=None, eps_floor_steps=50, flow_floor_steps=100, real_level=True, batch=1000,
                 grid_columns=10, calib_size="full"),
}
EPS_FLOOR_FAMILY = "dpmpp"
FLOOR_LABELS = {"dpmpp": "DPM-Solver++(2M)", "flow_euler": "Euler"}
# Metrics and their direction (True: higher is better).
METRICS = {"fd_mnist": False, "accuracy": True, "fid": False, "sfid": False, "precision": True, "recall": True}


@dataclass(frozen=True)
class Cell:
    name: str
    testbed: str  # "mnist" (28x28 eps) or "mnist_flow" (16x16 flow matching)
    family: str  # benchmarks.families key, or "flow_euler"
    nfe: int
    label: str


CELLS = (
    Cell("mnist_ddim_10", "mnist", "ddim", 10, "MNIST DDIM@10"),
    Cell("mnist_dpmpp_5", "mnist", "dpmpp", 5, "MNIST DPM-Solver++(2M)@5"),
    Cell("flow_euler_10", "mnist_flow", "flow_euler", 10, "flow MNIST FlowMatchEuler@10"),
)
CELL_NAMES = tuple(c.name for c in CELLS)


@dataclass
class SetPlan:
    """One sample set: its name, where and how it is sampled, and the set it equals (an identity table)."""
    name: str
    testbed: Any
    scheduler: Any
    family: str
    nfe: int
    timesteps: Optional[List[int]] = None
    identical_to: Optional[str] = None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=[], metavar="CELL=PATH",
                        help=f"extra tuned tables to measure beside the default one, CELL in {CELL_NAMES}; PATH: a "
                             "table_cache JSON (taus, grid, settings) or a saved TimeTuner scheduler (folder, bundled "
                             "name or Hub id, as load_tuned_scheduler takes); the method is named after PATH")
    parser.add_argument("--cells", nargs="+", default=list(CELL_NAMES), choices=CELL_NAMES)
    parser.add_argument("--no-inception", action="store_true", help="FD-MNIST and accuracy only (no Inception)")
    parser.add_argument("--report-only", action="store_true",
                        help="sample and compute nothing: write the results from the sets already in the cache (the "
                             "rest listed as not measured)")
    parser.add_argument("--features-only", action="store_true",
                        help="only compute the Inception features of the references and of every sample set already "
                             "in the cache that lacks them, then exit (a second process can do this while the main "
                             "run still samples; both write the cache atomically)")
    args = cli_args.add_common_args(parser).parse_args(argv)
    args.extra_tables = parse_tables(args.tables)
    return args


def parse_tables(specs: List[str]) -> List[tuple]:
    """``CELL=PATH`` strings -> [(cell, method name, path)], checked before any work."""
    out = []
    for spec in specs:
        cell, sep, path = spec.partition("=")
        if not sep or cell not in CELL_NAMES or not path:
            raise ValueError(f"--tables takes CELL=PATH with CELL in {CELL_NAMES}, got {spec!r}.")
        method = "table:" + Path(path.rstrip("/")).name.removesuffix(".json")
        if any((c, m) == (cell, method) for c, m, _ in out):
            raise ValueError(f"--tables names {method} twice for {cell}; rename one of the files.")
        out.append((cell, method, path))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Tables: which one, and its provenance
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Table:
    scheduler: Any  # a TimeTuner scheduler with the table for the cell's NFE
    timesteps: Optional[List[int]]  # a custom grid to sample on (None: the scheduler's own for nfe)
    provenance: Dict[str, Any]

    @property
    def key(self) -> str:
        cfg = self.scheduler.config
        blob = json.dumps({"class": type(self.scheduler).__name__, "taus": cfg.get("tuned_timesteps"),
                           "grids": cfg.get("tuned_grids"), "timesteps": self.timesteps}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def is_identity(self, nfe: int) -> bool:
        """True when the table feeds the grid itself (tau = t on the default grid): samples equal untuned."""
        from .families import scheduler_grid, tuned_taus

        taus = tuned_taus(self.scheduler, nfe)
        if taus is None or self.timesteps is not None:
            return taus is None
        return all(abs(a - b) < 1e-6 for a, b in zip(taus, scheduler_grid(self.scheduler, nfe)))


def best_gpu_table(cell: Cell) -> Optional[Path]:
    """The published-size table for `cell` whose own held-out endpoint error (recorded by calibrate) is lowest."""
    candidates = []
    for path in sorted(GPU_TABLES.glob(f"{cell.testbed}_{cell.family}_n{cell.nfe}_*.json")):
        entry = json.loads(path.read_text())
        held = (entry.get("report") or {}).get("heldout") or {}
        if "taus" in entry and held.get("endpoint_mse_tuned") is not None:
            candidates.append((held["endpoint_mse_tuned"], path))
    return min(candidates)[1] if candidates else None


def table_from_json(path: Path, testbed, family: str, nfe: int, how: str) -> Table:
    from .families import make_scheduler, scheduler_grid

    entry = json.loads(Path(path).read_text())
    if "taus" not in entry or len(entry["taus"]) != nfe:
        raise ValueError(f"{path} is not a table for {nfe} steps (expected a table_cache JSON with {nfe} taus).")
    settings = entry.get("settings", {})
    base = make_scheduler(family, testbed.noise_config, **settings.get("overrides", {}))
    grid = [float(t) for t in entry.get("grid") or scheduler_grid(base, nfe)]
    custom = None if grid == scheduler_grid(base, nfe) else [int(t) for t in grid]
    scheduler = base.with_tuned_timesteps(nfe, entry["taus"], grid=grid,
                                          info={"objective": settings.get("objective"), "source": str(path)})
    held = (entry.get("report") or {}).get("heldout") or {}
    return Table(scheduler, custom, {
        "source": how, "path": _repo_relative(path), "objective": settings.get("objective"),
        "calibration_samples": settings.get("num_samples"), "package_code": settings.get("code"),
        "made_on": entry.get("device"), "created_utc": entry.get("created_utc"), "taus": entry["taus"],
        "grid": grid, "heldout_endpoint_mse": {k: held.get(k) for k in ("num_samples", "endpoint_mse_untuned",
                                                                       "endpoint_mse_tuned", "relative_change")}})


def table_from_scheduler(name_or_path: str, nfe: int, how: str) -> Table:
    from diffusers_timetuner.hub import load_tuned_scheduler

    scheduler = load_tuned_scheduler(name_or_path)
    taus = (scheduler.config.get("tuned_timesteps") or {}).get(str(nfe))
    if taus is None:
        raise ValueError(f"{name_or_path} has no tuned table for {nfe} steps.")
    info = (scheduler.config.get("tuning_info") or {}).get(str(nfe), {})
    return Table(scheduler, None, {"source": how, "path": name_or_path, "taus": [float(t) for t in taus],
                                   "grid": (scheduler.config.get("tuned_grids") or {}).get(str(nfe)),
                                   "objective": info.get("objective"), "package_version": info.get("package_version"),
                                   "heldout": info.get("held_out") or info.get("heldout")})


def default_table(cell: Cell, testbed, args, device) -> Table:
    """The cell's tuned table by the rule of the module docstring (fixed before any metric here is seen)."""
    if cell.family == "flow_euler":
        return table_from_scheduler(BUNDLED_FLOW_TABLE, cell.nfe, f"bundled table {BUNDLED_FLOW_TABLE}")
    gpu = best_gpu_table(cell)
    if gpu is not None:
        return table_from_json(gpu, testbed, cell.family, cell.nfe,
                               "published-size (GPU) table with the lowest calibrate-recorded held-out endpoint "
                               "error among results/gpu_full/tables (made by an older package code; reused as is)")
    from .table_cache import calib_for, get_calibration, package_default_objective

    size = SIZES[args.size]["calib_size"]
    cal = get_calibration(testbed, cell.family, cell.nfe, device, tables_dir=args.tables_dir_resolved,
                          use_cache=not args.no_cache, objective=package_default_objective(),
                          calib=calib_for(size, testbed.name), seed=args.seed)
    return table_from_json(Path(cal.path), testbed, cell.family, cell.nfe,
                           f"table_cache calibration at the {size} sizes (no published-size table exists; "
                           f"{'cached' if cal.cached else 'computed in this run'})")


def _repo_relative(path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(cli_args.REPO))
    except ValueError:
        return str(p)


# ------------------------------------------------------------------------------------------------------------------
# Sample sets and their cache
# ------------------------------------------------------------------------------------------------------------------
class SetCache:
    """One file per set: ``<key>.samples.pt`` (samples, labels, classifier figures) and ``<key>.inception.pt``."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str, part: str) -> Path:
        return self.root / f"{key}.{part}.pt"

    def load(self, key: str, part: str):
        p = self.path(key, part)
        return torch.load(p, weights_only=False) if p.is_file() else None

    def lock(self, key: str) -> bool:
        """Claim `key`'s Inception features for this process; False when a live process holds them."""
        import os

        path = self.root / f"{key}.lock"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    os.kill(int(path.read_text() or 0), 0)
                    return False  # its holder is alive
                except (ProcessLookupError, ValueError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # left by a process that died: take it over
                    continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def unlock(self, key: str) -> None:
        (self.root / f"{key}.lock").unlink(missing_ok=True)

    def save(self, key: str, part: str, value) -> None:
        p = self.path(key, part)
        tmp = p.with_suffix(".tmp")
        torch.save(value, tmp)
        tmp.replace(p)  # atomic: a crash never leaves half a set


def set_key(what: str, n: int, seed: int) -> str:
    return f"{what}__n{n}__seed{seed}"


def main(args) -> dict:
    torch.set_num_threads(args.threads or 1)
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    args.tables_dir_resolved = str(run.tables_dir)
    size = SIZES[args.size]
    n, seed = size["n"], args.seed
    cache = SetCache(Path(args.out_dir) / CACHE / args.size)
    if args.features_only:
        return fill_features(cache, size, device)
    from .testbeds import load_testbed

    cells = [c for c in CELLS if c.name in args.cells]
    testbeds = {tb: load_testbed(tb, device) for tb in sorted({c.testbed for c in cells})}
    results: Dict[str, Any] = {"settings": {**size, "seed": seed, "cells": [c.name for c in cells],
                                            "eps_floor_family": EPS_FLOOR_FAMILY},
                               "references": {}, "sets": {}, "cells": {}, "not_measured": []}

    # 1. Tables (validated before any sampling); 2. sample sets with FD-MNIST / accuracy; 3. Inception features.
    plan: List[SetPlan] = []
    floors = {}
    for cell in cells:
        tb = testbeds[cell.testbed]
        tables = {"tuned": default_table(cell, tb, args, device)}
        for c, method, path in args.extra_tables:
            if c == cell.name:
                tables[method] = (table_from_json(Path(path), tb, cell.family, cell.nfe, "--tables")
                                  if path.endswith(".json") else table_from_scheduler(path, cell.nfe, "--tables"))
        untuned = untuned_scheduler(cell, tb)
        floor_steps = size["flow_floor_steps"] if cell.testbed == "mnist_flow" else size["eps_floor_steps"]
        floor_family = "flow_euler" if cell.testbed == "mnist_flow" else EPS_FLOOR_FAMILY
        floor_name = f"{cell.testbed}__floor_{floor_family}_{floor_steps}"
        floors[cell.name] = floor_name
        cell_info = {"label": cell.label, "testbed": cell.testbed, "nfe": cell.nfe, "floor": floor_name,
                     "floor_sampler": f"floor: {FLOOR_LABELS[floor_family]} {floor_steps} steps", "methods": {}}
        untuned_name = f"{cell.name}__untuned"
        plan.append(SetPlan(untuned_name, tb, untuned, cell.family, cell.nfe))
        cell_info["methods"]["untuned"] = untuned_name
        for method, table in tables.items():
            set_name = f"{cell.name}__{method}__{table.key}"
            same = untuned_name if table.is_identity(cell.nfe) else None
            plan.append(SetPlan(set_name, tb, table.scheduler, cell.family, cell.nfe, table.timesteps, same))
            cell_info["methods"][method] = set_name
            cell_info.setdefault("tables", {})[method] = {**table.provenance, "identical_to_untuned": same is not None}
        results["cells"][cell.name] = cell_info
        if floor_name not in [p.name for p in plan]:
            floor_sched = untuned_scheduler(Cell(floor_name, cell.testbed, floor_family, floor_steps, ""), tb)
            plan.append(SetPlan(floor_name, tb, floor_sched, floor_family, floor_steps))
    # Cheap sets first (the flow UNet costs ~1/16 of the eps UNet per evaluation), the 50-step floor last.
    plan.sort(key=lambda p: p.nfe * (0.06 if p.testbed.name == "mnist_flow" else 1.0))


    def write():
        for cell_name, info in results["cells"].items():
            info["comparison"] = compare(results["sets"], info, cache, n, seed)
        # what the figures cost, from the cached sets' own timings (a later run that only reads the cache, e.g. to
        # add a table, still reports the cost of every set)
        timed = [s for k, s in results["sets"].items() if not s["identical_to"]]
        results["compute_s"] = {"sampling": sum(s["sampling_s"] for s in timed),
                                "inception": sum(s.get("inception_s", 0.0) for s in timed)
                                + sum(r.get("inception_s") or 0.0 for r in results["references"].values()),
                                "threads": sorted({s["sampling_threads"] for s in timed if s.get("sampling_threads")})}
        results["not_measured"] = sorted(not_measured(results, plan, args))
        fig = sample_grid(results, cache, n, seed, size["grid_columns"]) if results["sets"] else None
        return run.write(results, markdown(results, args), fig)

    for p in plan:
        name, nfe, same = p.name, p.nfe, p.identical_to
        key = set_key(same or name, n, seed)
        if cache.load(key, "samples") is None:
            if args.report_only:
                continue
            cli_args.log(f"{NAME}: sampling {name} ({n} samples, {nfe} steps)")
            tick = time.perf_counter()
            samples = generate(p.testbed, p.scheduler, None if p.timesteps else nfe, n, seed, device,
                               batch_size=size["batch"], family=p.family if p.family in FAMILIES else None,
                               timesteps=p.timesteps)
            labels = p.testbed.labels_for(n, "cpu")["class_labels"]
            cls = mnist_metrics(samples, labels, device)
            cache.save(key, "samples", {"samples": samples, "labels": labels, "fd_mnist": cls["fd"],
                                        "accuracy": cls["accuracy"], "sampling_s": time.perf_counter() - tick,
                                        "nfe": nfe, "threads": torch.get_num_threads()})
        entry = cache.load(key, "samples")
        results["sets"][name] = {"cache_key": key, "identical_to": same, "n_samples": int(entry["samples"].shape[0]),
                                 "steps": nfe, "fd_mnist": entry["fd_mnist"], "accuracy": entry["accuracy"],
                                 "sampling_s": entry["sampling_s"], "sampling_threads": entry.get("threads")}
        cli_args.log(f"{NAME}: {name}: FD-MNIST {entry['fd_mnist']:.3f}, accuracy {entry['accuracy']:.4f}")
        write()

    if args.no_inception:
        return write()
    ref_keys = {name: reference_key(name, size, cache) for name in testbeds}
    set_keys = [results["sets"][p.name]["cache_key"] for p in plan if p.name in results["sets"]]
    if not args.report_only:
        compute_features(cache, list(ref_keys.values()) + list(dict.fromkeys(set_keys)), device)
    refs = {}
    for name, key in ref_keys.items():
        refs[name] = cache.load(key, "inception")
        results["references"][name] = reference_info(name, key, refs[name])
    for p in plan:
        st = results["sets"].get(p.name)
        feats = None if st is None else cache.load(st["cache_key"], "inception")
        if feats is None or refs[p.testbed.name] is None:
            continue
        st.update(inception_scores(refs[p.testbed.name], feats))
        cli_args.log(f"{NAME}: {p.name}: FID {st['fid']:.2f}, sFID {st['sfid']:.2f}, P {st['precision']:.3f}, "
                     f"R {st['recall']:.3f}")
    write()
    if size["real_level"]:
        for name in testbeds:
            if refs[name] is not None:
                level = real_level(name, n, cache, device, refs[name], args.report_only)
                if level is not None:
                    results["references"][name]["real_level"] = level
                    write()
    return write()


def untuned_scheduler(cell: Cell, tb):
    if cell.family == "flow_euler":
        from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler

        return TimeTunerFlowMatchEulerDiscreteScheduler.from_config(tb.noise_config)
    from .families import make_scheduler

    return make_scheduler(cell.family, tb.noise_config)


# ------------------------------------------------------------------------------------------------------------------
# Inception features and scores
# ------------------------------------------------------------------------------------------------------------------
def _features(images: torch.Tensor, device) -> Dict[str, torch.Tensor]:
    from diffusers_timetuner.inception import InceptionFeatures

    net = InceptionFeatures(device=device, batch_size=50, progress=False)
    pool, spatial = net(images.clamp(-1, 1), data_range=(-1.0, 1.0), spatial=True)
    return {"pool": pool.float(), "spatial": spatial.float()}  # float32 on disk: half the size, ample precision


# Which Inception features first when several processes share the work: the DDIM@10 cell and the floor it needs,
# then the flow cell, then DPM-Solver++@5 (whose default table may equal untuned), then the real-data levels.
FEATURE_PRIORITY = ("reference_mnist_heldout", "mnist_ddim_10__", "mnist__floor", "reference_mnist_flow",
                    "flow_euler_10__", "mnist_flow__floor", "mnist_dpmpp_5__", "real_")


def _priority(key: str) -> int:
    return next((i for i, prefix in enumerate(FEATURE_PRIORITY) if key.startswith(prefix)), len(FEATURE_PRIORITY))


def fill_features(cache: SetCache, size, device) -> None:
    """--features-only: the references, then every cached sample set lacking features, highest priority first,
    looking again after each set (the main run may have sampled more meanwhile)."""
    for tb in ("mnist", "mnist_flow"):
        reference_key(tb, size, cache)
    while True:
        keys = [p.name.removesuffix(".samples.pt") for p in cache.root.glob("*.samples.pt")]
        todo = sorted((k for k in keys if not cache.path(k, "inception").is_file()), key=_priority)
        claimed = next((k for k in todo if cache.lock(k)), None)
        if claimed is None:
            return
        try:
            inception_features(cache, claimed, device)
        finally:
            cache.unlock(claimed)


def compute_features(cache: SetCache, keys: List[str], device) -> None:
    """Inception features of every key that lacks them, highest priority first. A key another process is working on
    (its lock file names a live process) is left to it and waited for, so two processes can share the work without
    doing a set twice."""
    pending = sorted(keys, key=_priority)
    while pending:
        busy = []
        for key in pending:
            if cache.path(key, "inception").is_file():
                continue
            if not cache.lock(key):
                busy.append(key)
                continue
            try:
                inception_features(cache, key, device)
            finally:
                cache.unlock(key)
        pending = [k for k in busy if not cache.path(k, "inception").is_file()]
        if pending:
            time.sleep(10)


def inception_features(cache: SetCache, key: str, device) -> Dict[str, torch.Tensor]:
    feats = cache.load(key, "inception")
    if feats is None:
        samples = cache.load(key, "samples")["samples"]
        cli_args.log(f"{NAME}: Inception features of {key} ({samples.shape[0]} images)")
        tick = time.perf_counter()
        feats = {**_features(samples, device), "seconds": time.perf_counter() - tick,
                 "threads": torch.get_num_threads()}
        cache.save(key, "inception", feats)
    return feats


def reference_images(testbed: str, n_reference: Optional[int]) -> torch.Tensor:
    from diffusers_timetuner.testbeds.data import downsample, load_mnist

    images, _ = load_mnist("heldout")
    images = images[:n_reference] if n_reference else images
    return downsample(images, 16) if testbed == "mnist_flow" else images


def reference_key(testbed: str, size, cache: SetCache) -> str:
    """The reference digits as a cached set (so their features are cached like a sample set's)."""
    images = reference_images(testbed, size["n_reference"])
    key = f"reference_{testbed}_heldout__n{images.shape[0]}"
    if cache.load(key, "samples") is None:
        cache.save(key, "samples", {"samples": images})
    return key


def reference_info(testbed: str, key: str, feats) -> Dict[str, Any]:
    count = int(key.rsplit("__n", 1)[1])
    return {"images": "held-out real MNIST digits (testbeds.data split 'heldout', never trained on)"
                      + (", area-downsampled to 16x16" if testbed == "mnist_flow" else ", 28x28"),
            "count": count, "cache_key": key,
            "inception_s": None if feats is None else float(feats.get("seconds", 0.0))}


def real_level(testbed: str, n: int, cache, device, ref, report_only: bool) -> Optional[Dict[str, Any]]:
    """Every metric for real training digits (as many as samples, at most 4000, the same count of each class)
    against the same reference."""
    from diffusers_timetuner.testbeds.data import downsample, load_mnist
    images, labels = load_mnist("train")  # ordered by class: take the first n / 10 of each class
    per_class = min(n, images.shape[0]) // 10
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    images, labels = images[keep], labels[keep]
    if testbed == "mnist_flow":
        images = downsample(images, 16)
    key = f"real_{testbed}_train_balanced__n{images.shape[0]}"
    if cache.load(key, "samples") is None:
        cache.save(key, "samples", {"samples": images})
    if report_only and not cache.path(key, "inception").is_file():
        return None
    cls = mnist_metrics(images, labels, device)
    compute_features(cache, [key], device)
    feats = cache.load(key, "inception")
    return {"images": "real MNIST training digits (split 'train', the same count of each class)",
            "count": int(images.shape[0]),
            "fd_mnist": cls["fd"], "accuracy": cls["accuracy"], **inception_scores(ref, feats)}


def inception_scores(ref, feats) -> Dict[str, float]:
    from diffusers_timetuner.inception import fid, precision_recall

    precision, recall = precision_recall(ref["pool"], feats["pool"], k=3)
    return {"fid": fid(ref["pool"], feats["pool"]), "sfid": fid(ref["spatial"], feats["spatial"]),
            "precision": precision, "recall": recall, "inception_s": float(feats.get("seconds", 0.0))}


# ------------------------------------------------------------------------------------------------------------------
# Comparison: gap to the floor closed, endpoint distance to the floor sample
# ------------------------------------------------------------------------------------------------------------------
def compare(sets, info, cache, n, seed) -> Dict[str, Any]:
    floor, untuned = sets.get(info["floor"]), sets.get(info["methods"]["untuned"])
    out = {}
    for method, set_name in info["methods"].items():
        if method == "untuned" or set_name not in sets or untuned is None:
            continue
        tuned, row = sets[set_name], {}
        for metric, higher_better in METRICS.items():
            if metric not in tuned or metric not in untuned:
                continue
            row[f"{metric}_change"] = writer.rel_change(tuned[metric], untuned[metric])
            if floor is not None and metric in floor:
                gap = floor[metric] - untuned[metric]
                useful = gap > 0 if higher_better else gap < 0
                row[f"{metric}_gap_closed"] = (tuned[metric] - untuned[metric]) / gap if useful else None
        if floor is not None:
            row["endpoint_to_floor"] = endpoint_change(cache, untuned, tuned, floor)
        out[method] = row
    return out


def endpoint_change(cache, untuned, tuned, floor) -> Dict[str, float]:
    """Per-sample squared L2 distance of the endpoint to the floor's sample from the same x_T: means, paired change
    (tuned - untuned) and its paired standard error (`metrics.paired_difference`)."""
    from diffusers_timetuner.metrics import paired_difference

    ref = cache.load(floor["cache_key"], "samples")["samples"].double()
    d = {}
    for name, s in (("untuned", untuned), ("tuned", tuned)):
        x = cache.load(s["cache_key"], "samples")["samples"].double()
        d[name] = (x - ref).flatten(1).square().sum(1)
    change, se = paired_difference(d["tuned"], d["untuned"])
    return {"untuned_mean_sq": float(d["untuned"].mean()), "tuned_mean_sq": float(d["tuned"].mean()),
            "change": change, "paired_se": se, "relative_change": writer.rel_change(float(d["tuned"].mean()),
                                                                                    float(d["untuned"].mean())),
            "share_of_x_T_closer": float((d["tuned"] < d["untuned"]).double().mean())}


def not_measured(results, plan, args) -> List[str]:
    missing = []
    for p in plan:
        name = p.name
        s = results["sets"].get(name)
        if s is None:
            missing.append(f"{name}: samples")
        elif not args.no_inception and "fid" not in s:
            missing.append(f"{name}: Inception metrics")
    if results["settings"]["real_level"] and not args.no_inception:
        missing += [f"real-data level ({tb})" for tb, ref in results["references"].items() if "real_level" not in ref]
    return missing


# ------------------------------------------------------------------------------------------------------------------
# Markdown and the sample grid
# ------------------------------------------------------------------------------------------------------------------
def _fmt(v, spec=".3f"):
    return "not measured" if v is None else format(v, spec)


def _gap(share: Optional[float]) -> Optional[str]:
    if share is None:
        return None
    return f"{100 * share:+.0f}%" + (" (beyond the floor)" if share > 1 else "")


def markdown(results, args) -> str:
    s = results["settings"]
    lines = [f"# {NAME}: the headline cells in FD-MNIST, FID, sFID, precision / recall", "",
             f"{s['n']} samples per set, seed {s['seed']}: row j of one CPU generator is x_T of sample j in every "
             "set, class labels cycle 0..9. FD-MNIST against the 1000 held-out digits (at 16x16 for the flow "
             "model); Inception FID / sFID / improved precision / recall (k = 3) against the reference below. "
             "Floors: DPM-Solver++(2M) at "
             f"{s['eps_floor_steps']} steps (28x28 eps UNet), Euler at {s['flow_floor_steps']} steps (16x16 flow "
             "UNet). Lower FD / FID / sFID is better, higher accuracy / precision / recall.", ""]
    for tb, ref in results["references"].items():
        lines.append(f"- reference for {tb}: {ref['count']} {ref['images']}")
        lvl = ref.get("real_level")
        if lvl:
            lines.append(f"  - real-data level ({lvl['count']} {lvl['images']}): FD-MNIST {lvl['fd_mnist']:.3f}, "
                         f"FID {lvl['fid']:.2f}, sFID {lvl['sfid']:.2f}, precision {lvl['precision']:.3f}, "
                         f"recall {lvl['recall']:.3f}")
    lines.append("")
    header = ["cell", "sampler", "samples", "FD-MNIST", "accuracy", "FID", "sFID", "precision", "recall"]
    rows = []
    for info in results["cells"].values():
        for method, set_name in list(info["methods"].items()) + [("floor", info["floor"])]:
            st = results["sets"].get(set_name, {})
            label = info["floor_sampler"] if method == "floor" else method
            rows.append([info["label"], label, st.get("n_samples", "not measured")]
                        + [_fmt(st.get(m), ".2f" if m in ("fid", "sfid") else ".3f") for m in METRICS])
    lines.append(writer.markdown_table(header, rows))
    lines += ["Share of the untuned -> floor gap closed by the tuned table (negative: moved away from the floor; "
              "'-': the floor is not better than untuned on that metric), and the endpoint's squared L2 distance "
              "to the floor sample from the same x_T (paired change tuned - untuned, +/- its paired SE):", ""]
    header = ["cell", "table", "FD-MNIST gap closed", "FID gap closed", "sFID gap closed", "precision gap closed",
              "recall gap closed", "endpoint distance to floor (untuned -> tuned)", "paired change +/- SE"]
    rows = []
    for info in results["cells"].values():
        for method, row in info.get("comparison", {}).items():
            e = row.get("endpoint_to_floor")
            same = info.get("tables", {}).get(method, {}).get("identical_to_untuned")
            rows.append([info["label"], method + (" (= untuned)" if same else "")] + [
                _gap(row.get(f"{m}_gap_closed")) for m in ("fd_mnist", "fid", "sfid", "precision", "recall")] + [
                None if e is None else f"{e['untuned_mean_sq']:.2f} -> {e['tuned_mean_sq']:.2f}",
                None if e is None else f"{e['change']:+.3f} +/- {e['paired_se']:.3f}"])
    lines.append(writer.markdown_table(header, rows))
    lines += ["Tables:", ""]
    for info in results["cells"].values():
        for method, t in info.get("tables", {}).items():
            held = t.get("heldout_endpoint_mse") or t.get("heldout")
            lines.append(f"- {info['label']} `{method}`: {t['source']}: `{t['path']}`"
                         + (f", objective {t['objective']}" if t.get("objective") else "")
                         + (f", {t['calibration_samples']} calibration samples" if t.get("calibration_samples") else "")
                         + (f", package code {t['package_code']}" if t.get("package_code") else "")
                         + (f", made on {t['made_on']}" if t.get("made_on") else "")
                         + (f"; calibrate's held-out check: {json.dumps(held)}" if held else "")
                         + ("; **the guard kept tau = t, so the tuned samples equal the untuned ones**"
                            if t.get("identical_to_untuned") else ""))
    lines.append("")
    if results["not_measured"]:
        lines += ["Not measured (yet): " + "; ".join(results["not_measured"]), ""]
    c = results.get("compute_s") or {}
    if args.report_only:
        lines += ["Written with --report-only from the per-set cache: every figure comes from sets computed by "
                  "earlier runs of this script at the same size and seed (their cost below).", ""]
    if c:
        lines += [f"Compute (every set's own timing, cached sets included): sampling {c['sampling']:.0f} s, "
                  f"Inception features {c['inception']:.0f} s, torch threads {c['threads']}.", ""]
    lines += ["Sample grid (same x_T per column): `headline_fid.png`.", ""]
    return "\n".join(lines)


def sample_grid(results, cache, n, seed, columns):
    """Rows untuned / tuned (each method) / floor per cell, the first `columns` samples (labels 0, 1, ...)."""
    rows = []
    for info in results["cells"].values():
        for method, set_name in list(info["methods"].items()) + [("floor", info["floor"])]:
            st = results["sets"].get(set_name)
            if st is None:
                continue
            images = cache.load(st["cache_key"], "samples")["samples"][:columns]
            label = info["floor_sampler"] if method == "floor" else method
            fid = f"\nFID {st['fid']:.1f}" if "fid" in st else ""
            rows.append((f"{info['label']}\n{label}\nFD-MNIST {st['fd_mnist']:.2f}{fid}", images))
    fig, axes = writer.figure(1, len(rows), size=(0.9 * columns + 2.4, 1.15))
    for ax, (label, images) in zip(axes[:, 0], rows):
        images = ((images.float() + 1) / 2).clamp(0, 1)
        pad = torch.full((1, images.shape[2], 2), 0.5)  # grey separators
        strip = torch.cat([t for im in images for t in (im, pad)][:-1], dim=2)[0].numpy()
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"same x_T per column (seed {seed}, labels 0..{columns - 1}); figures over {n} samples per set",
                 fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
