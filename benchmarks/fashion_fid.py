"""Fashion-MNIST testbed: Inception FID vs NFE per sampler, untuned vs tuned vs a many-step floor.

The model is the bundled class-conditional 16x16 Fashion-MNIST UNet (`testbeds.load_fashion_pipeline`, epsilon
prediction, linear betas), the testbed with more few-step headroom than MNIST. For each sampler (DDIM, DPM-Solver++
(2M); DPM-Solver-2 at ``--full``) and NFE, a table is calibrated through `table_cache` (data-free: x_T ~ N(0, I), the
package's 100-step DPM-Solver++ teacher, its validation guard); then untuned, tuned and one many-step floor (DDIM at
100 steps) sample the SAME evaluation x_T and labels (seed ``--seed`` + 1000, disjoint from calibrate's draws at
``--seed``, + 1, + 2; labels 0..9 in turn, 50 of each at 500 samples, as in the reference). Each set is scored by
Inception FID, sFID and improved precision / recall (k = 3) against the 500 bundled real test images
(`testbeds/fashion/reference_test_16px.npz`, the `inception.py` features) and by the bundled linear classifier's
class accuracy. Per cell: headroom = FID(untuned) - FID(floor) and the share of it the tuned table closes.

Objective: endpoint and teacher_local are both calibrated at one pilot cell (``pilot``, DDIM at 10 steps); the one
whose table has the lower held-out endpoint error to the teacher (calibrate's own held-out set, never the FID sets)
tunes every cell. The choice and both held-out figures are recorded.

FID from 500 samples against 500 reference images is biased upwards (500 other real test images score about 30.7
against the reference): compare values only within one run. The FID change of each cell comes with a paired
bootstrap standard error (the same resampled x_T indices for untuned and tuned).

Inception features of every set are cached in ``<out-dir>/fashion_fid_cache/`` under a hash of what decides the set
(sampler, NFE, table, sample count, seed, package code, UNet and Inception weights), so an interrupted run loses one
set; the JSON / Markdown / PNG are rewritten after every cell, and cells not reached are listed as "not measured".

Usage: python -m benchmarks.fashion_fid --quick|--medium [--threads 2] [--nfes 10 5] [--samplers ddim dpmpp]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import cli_args, writer
from .evaluation import generate
from .families import FAMILIES, make_scheduler
from .provenance import code_fingerprint
from .table_cache import CALIB, try_calibration
from .testbeds import load_testbed

NAME = "fashion_fid"
OBJECTIVES = ("endpoint", "teacher_local")  # the two candidates the pilot cell chooses between
STRATEGY = "data_free"  # the testbed ships no training data
EVAL_SEED_OFFSET = 1000  # evaluation x_T: a seed none of calibrate's draws (seed, seed + 1, seed + 2) uses
SIZES: Dict[str, Dict[str, Any]] = {
    # CI smoke size: 10 samples against 10 reference images (1 per class), tiny calibration sets.
    "quick": dict(n=10, n_reference=10, samplers=["ddim"], nfes=[4], pilot=("ddim", 4), floor=("ddim", 10),
                  calib=CALIB["quick"], bootstrap=20),
    # NFEs in the order they are measured: the headline cells first, so a short run still has them.
    "medium": dict(n=500, n_reference=500, samplers=["ddim", "dpmpp"], nfes=[10, 5, 4, 8, 6], pilot=("ddim", 10),
                   # 64 calibration / 32 validation x_T (the MNIST UNet's CPU sizes) left the guard unable to tell
                   # any table from tau = t at DDIM@10 and DPM-Solver++@10 (held-out 1.525 -> 1.525); a 64-sample
                   # calibration took about a minute on one idle core, so four times as many x_T fit a CPU run.
                   floor=("ddim", 100), calib=dict(num_samples=256, batch_size=128, validation_samples=128,
                                                   heldout_samples=128, adam_steps=500), bootstrap=50),
    "full": dict(n=500, n_reference=500, samplers=["ddim", "dpmpp", "dpm2"], nfes=[10, 5, 4, 8, 6], pilot=("ddim", 10),
                 floor=("ddim", 100), calib=CALIB["full"], bootstrap=200),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfes", type=int, nargs="+", default=None, help="override the size's NFE list (in order)")
    parser.add_argument("--samplers", nargs="+", default=None, choices=["ddim", "dpmpp", "dpm2"],
                        help="override the size's samplers")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="only compute the calibration tables (pilot first) into the table cache; no sampling")
    parser.add_argument("--cache-dir", default=None,
                        help="per-set Inception feature cache (default <out-dir>/fashion_fid_cache)")
    args = cli_args.add_common_args(parser).parse_args(argv)
    for nfe in args.nfes or []:
        if nfe < 2:
            parser.error(f"--nfes must be >= 2 (a table needs at least two steps), got {nfe}")
    return args


# ------------------------------------------------------------------------------------------------------------------
# One sample set: sampled, featurised (cached), scored
# ------------------------------------------------------------------------------------------------------------------
class SetScorer:
    """Samples the evaluation x_T with a scheduler and scores the set; Inception features cached per set on disk."""

    def __init__(self, testbed, size: Dict[str, Any], seed: int, device, cache_dir: Path):
        from diffusers_timetuner.inception import INCEPTION_WEIGHTS_SHA1, InceptionFeatures
        from diffusers_timetuner.testbeds import FASHION_MODEL_DIR
        from diffusers_timetuner.testbeds.fashion.reference import load_reference

        self.tb, self.n, self.device = testbed, size["n"], device
        self.seed = seed + EVAL_SEED_OFFSET
        self.labels = testbed.labels_for(self.n, "cpu")["class_labels"]
        self.cache_dir = cache_dir
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.features = InceptionFeatures(device=device, batch_size=50, progress=False)
        weights = Path(FASHION_MODEL_DIR) / "unet" / "diffusion_pytorch_model.safetensors"
        self.fingerprint = {"code": code_fingerprint(), "inception": INCEPTION_WEIGHTS_SHA1,
                            "model": _file_sha1(weights)}
        images, labels = load_reference()
        keep = _per_class_prefix(labels, size["n_reference"] // testbed.num_classes)
        self.n_reference = int(keep.numel())
        self.reference = self._cached("reference", {"what": "reference", "indices": keep.tolist()},
                                      lambda: (images[keep], labels[keep]))

    def sample_set(self, what: str, family: str, nfe: int, taus: Optional[List[float]] = None) -> Dict[str, Any]:
        """The set `family`@`nfe` (tuned when `taus` is given) from the evaluation x_T: its cached features."""

        def sample():
            sched = make_scheduler(family, self.tb.noise_config)
            if taus is not None:
                sched = sched.with_tuned_timesteps(nfe, taus, info={"source": "benchmarks"})
            x = generate(self.tb, sched, nfe, self.n, self.seed, self.device, batch_size=500, family=family)
            return x, self.labels

        key = {"what": "samples", "family": family, "config": FAMILIES[family].config, "nfe": nfe, "taus": taus,
               "n": self.n, "seed": self.seed}
        return self._cached(what, key, sample)

    def score(self, entry: Dict[str, Any]) -> Dict[str, Any]:
        return {**metrics(self.reference, entry), "n_samples": self.n, "cached": entry["cached"]}

    def _cached(self, what: str, key: Dict[str, Any], make) -> Dict[str, Any]:
        key = {**key, **self.fingerprint, "testbed": self.tb.name}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = self.cache_dir / f"{what.replace(' ', '_').replace('@', '_')}_{digest}.pt"
        if path.exists():
            entry = torch.load(path)
            entry["cached"] = True
            return entry
        from diffusers_timetuner.testbeds.fashion.classifier import class_accuracy

        images, labels = make()
        cli_args.log(f"{NAME}: Inception features of {what} ({images.shape[0]} images)")
        pool, spatial = self.features(images.clamp(-1.0, 1.0), data_range=(-1.0, 1.0), spatial=True)
        # float32 on disk, and the metrics are always computed from the float32 copy: a cached and a fresh run agree.
        entry = {"pool": pool.float(), "spatial": spatial.float(), "accuracy": class_accuracy(images, labels),
                 "uint8": ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), "key": key}
        tmp = path.with_suffix(".tmp")
        torch.save(entry, tmp)
        tmp.replace(path)  # atomic: a killed run leaves no half-written set
        entry["cached"] = False
        return entry


def _file_sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _per_class_prefix(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first `per_class` reference images of every class (the whole reference at 50)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in sorted(set(labels.tolist()))])


def metrics(reference: Dict[str, Any], entry: Dict[str, Any]) -> Dict[str, float]:
    from diffusers_timetuner.inception import fid, precision_recall

    ref_pool, pool = reference["pool"].double(), entry["pool"].double()
    precision, recall = precision_recall(ref_pool, pool, k=3)
    return {"fid": fid(ref_pool, pool), "sfid": fid(reference["spatial"].double(), entry["spatial"].double()),
            "precision": precision, "recall": recall, "accuracy": float(entry["accuracy"])}


def paired_bootstrap_se(reference, a, b, reps: int, seed: int) -> float:
    """SE of FID(b) - FID(a) over bootstrap resamples of the x_T indices (the same indices for both sets: the sets
    share their x_T). Resampling duplicates points, so it is an indication of the noise, not an exact interval."""
    from diffusers_timetuner.inception import fid

    ref, pa, pb = reference["pool"].double(), a["pool"].double(), b["pool"].double()
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(reps):
        idx = torch.randint(0, pa.shape[0], (pa.shape[0],), generator=g)
        diffs.append(fid(ref, pb[idx]) - fid(ref, pa[idx]))
    return float(torch.tensor(diffs, dtype=torch.float64).std())


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
def main(args) -> dict:
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    size = SIZES[args.size]
    samplers, nfes = args.samplers or size["samplers"], args.nfes or size["nfes"]
    tb = load_testbed("fashion", device)
    calib_kwargs = dict(tables_dir=run.tables_dir, use_cache=not args.no_cache, calib=size["calib"],
                        strategy=STRATEGY, seed=args.seed)
    if args.calibrate_only:
        return calibrate_only(tb, size, samplers, nfes, device, calib_kwargs)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.out_dir) / f"{NAME}_cache"
    scorer = SetScorer(tb, size, args.seed, device, cache_dir)
    results: Dict[str, Any] = {
        "settings": {"n_samples": size["n"], "n_reference": scorer.n_reference, "samplers": samplers, "nfes": nfes,
                     "pilot": {"family": size["pilot"][0], "nfe": size["pilot"][1]},
                     "floor": {"family": size["floor"][0], "nfe": size["floor"][1]},
                     "calibration": {**size["calib"], "strategy": STRATEGY, "seed": args.seed},
                     "evaluation_seed": scorer.seed, "bootstrap_reps": size["bootstrap"],
                     "objective_candidates": list(OBJECTIVES)},
        "objective_choice": None, "cells": {s: {} for s in samplers}, "not_measured": [],
    }

    def publish():
        results["not_measured"] = [f"{s}@{n}" for n in nfes for s in samplers if str(n) not in results["cells"][s]]
        return run.write(results, markdown(results), plot(results))

    family, steps = size["floor"]
    cli_args.log(f"{NAME}: floor {family}@{steps}, {size['n']} samples")
    results["floor"] = {"family": family, "nfe": steps,
                        **scorer.score(scorer.sample_set(f"floor {family}@{steps}", family, steps))}
    pilot_family, pilot_nfe = size["pilot"]
    if not run.out_of_time(f"objective pilot {pilot_family}@{pilot_nfe}"):
        results["objective_choice"] = choose_objective(tb, pilot_family, pilot_nfe, device, calib_kwargs)
    publish()
    for nfe in nfes:
        for sampler in samplers:
            if results["objective_choice"] is None or run.out_of_time(f"{sampler}@{nfe}"):
                continue
            objective = results["objective_choice"]["chosen"]
            cell = measure_cell(tb, scorer, sampler, nfe, objective, calib_kwargs, device, size, results)
            results["cells"][sampler][str(nfe)] = cell
            publish()
    return publish()


def calibrate_only(tb, size, samplers, nfes, device, calib_kwargs) -> dict:
    """--calibrate-only: the pilot and every cell's table into the table cache, in the order the full run needs
    them, and nothing else (a second process can do this while the first computes Inception features)."""
    choice = choose_objective(tb, *size["pilot"], device, calib_kwargs)
    for nfe in nfes:
        for sampler in samplers:
            try_calibration(tb, sampler, nfe, device, objective=choice["chosen"], **calib_kwargs)
    return {"objective_choice": choice}


def choose_objective(tb, sampler: str, nfe: int, device, calib_kwargs) -> Dict[str, Any]:
    """Calibrate every candidate objective at the pilot cell; choose the lowest held-out endpoint error."""
    candidates = {}
    for objective in OBJECTIVES:
        cal, err = try_calibration(tb, sampler, nfe, device, objective=objective, **calib_kwargs)
        candidates[objective] = {"error": err} if cal is None else held_out(cal)
    ok = {k: v for k, v in candidates.items() if "error" not in v}
    if not ok:
        raise RuntimeError(f"{NAME}: every objective failed to calibrate {sampler}@{nfe}: {candidates}")
    # Ties (e.g. both guards kept tau = t) go to the first candidate in OBJECTIVES order.
    chosen = min(ok, key=lambda k: (ok[k]["endpoint_mse_tuned"], OBJECTIVES.index(k)))
    cli_args.log(f"{NAME}: {sampler}@{nfe} objective pilot: " + ", ".join(
        f"{k} held-out {v.get('endpoint_mse_tuned', float('nan')):.4g}" for k, v in candidates.items())
        + f" -> {chosen}")
    return {"family": sampler, "nfe": nfe, "chosen": chosen, "candidates": candidates,
            "rule": "lowest held-out endpoint MSE to the teacher (calibrate's held-out x_T, not the FID sets)"}


def held_out(cal) -> Dict[str, Any]:
    h = cal.report.get("heldout") or {}
    return {"endpoint_mse_tuned": float(h["endpoint_mse_tuned"]),
            "endpoint_mse_untuned": float(h["endpoint_mse_untuned"]),
            "change_se": h.get("endpoint_mse_change_se"), "kept_steps": cal.report.get("kept_steps"),
            "identity": cal.taus == cal.grid, "forward_samples": cal.report.get("forward_samples"),
            "seconds": cal.report.get("wall_time_s"), "table": Path(cal.path).name}


def measure_cell(tb, scorer, sampler, nfe, objective, calib_kwargs, device, size, results) -> Dict[str, Any]:
    t0 = time.perf_counter()
    cal, err = try_calibration(tb, sampler, nfe, device, objective=objective, **calib_kwargs)
    cell: Dict[str, Any] = {"objective": objective, "calibration_error": err}
    untuned = scorer.sample_set(f"{sampler}@{nfe} untuned", sampler, nfe)
    cell["untuned"] = scorer.score(untuned)
    if cal is not None:
        cell["calibration"] = held_out(cal)
        cell["taus"], cell["grid"] = cal.taus, cal.grid
        # A table the guard reduced to tau = t samples bit for bit like untuned: the same set, not sampled twice.
        taus = None if cal.taus == cal.grid else cal.taus
        tuned = untuned if taus is None else scorer.sample_set(f"{sampler}@{nfe} tuned", sampler, nfe, taus)
        cell["tuned"] = scorer.score(tuned)
        cell["fid_change"] = cell["tuned"]["fid"] - cell["untuned"]["fid"]
        cell["fid_change_se"] = 0.0 if taus is None else paired_bootstrap_se(scorer.reference, untuned, tuned,
                                                                             size["bootstrap"], nfe)
        cell["fid_rel_change"] = writer.rel_change(cell["tuned"]["fid"], cell["untuned"]["fid"])
    floor = results["floor"]["fid"]
    cell["headroom"] = cell["untuned"]["fid"] - floor
    cell["headroom_rel"] = writer.rel_change(cell["untuned"]["fid"], floor)
    # Share of the untuned -> floor gap the table closes; undefined when untuned is not above the floor.
    cell["gap_closed"] = (cell["untuned"]["fid"] - cell["tuned"]["fid"]) / cell["headroom"] \
        if "tuned" in cell and cell["headroom"] > 0 else None
    cell["seconds"] = time.perf_counter() - t0
    t = cell.get("tuned")
    cli_args.log(f"{NAME}: {sampler}@{nfe} ({objective}): FID untuned {cell['untuned']['fid']:.2f}"
                 + ("" if t is None else f" -> tuned {t['fid']:.2f} ({cell['fid_change']:+.2f} +/- "
                                         f"{cell['fid_change_se']:.2f})")
                 + f", floor {floor:.2f}; gap closed {_pct(cell['gap_closed'])}")
    return cell


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:+.0f}%"


# ------------------------------------------------------------------------------------------------------------------
# Markdown and plot
# ------------------------------------------------------------------------------------------------------------------
def markdown(results) -> str:
    s, floor = results["settings"], results.get("floor")
    lines = [f"# {NAME}", "",
             f"Bundled 16x16 class-conditional Fashion-MNIST UNet; {s['n_samples']} samples per set (the same x_T "
             f"and labels in every set, seed {s['evaluation_seed']}), Inception FID / sFID / precision / recall "
             f"(k = 3) against {s['n_reference']} bundled real test images, class accuracy by the bundled linear "
             "classifier. FID from so few samples is biased upwards (at 500 vs the 500 reference images, 500 other "
             "real test images score 30.7, the testbed's PROVENANCE.md): compare only within this table. "
             "Calibration: data-free, "
             f"{s['calibration']['num_samples']} calibration / {s['calibration']['validation_samples']} validation / "
             f"{s['calibration']['heldout_samples']} held-out x_T, the package's 100-step DPM-Solver++ teacher.", ""]
    if floor:
        lines.append(f"- many-step floor ({floor['family']}@{floor['nfe']}): FID {floor['fid']:.2f}, sFID "
                     f"{floor['sfid']:.2f}, precision {floor['precision']:.3f}, recall {floor['recall']:.3f}, "
                     f"accuracy {100 * floor['accuracy']:.1f}%")
    c = results["objective_choice"]
    if c is not None:
        parts = [f"{k}: {v['endpoint_mse_tuned']:.4g} (untuned {v['endpoint_mse_untuned']:.4g}"
                 f"{', guard kept tau = t' if v['identity'] else ''})" if "error" not in v
                 else f"{k}: failed ({v['error']})" for k, v in c["candidates"].items()]
        lines.append(f"- objective, chosen at {FAMILIES[c['family']].label}@{c['nfe']} by the held-out endpoint MSE "
                     f"to the teacher (calibrate's own held-out x_T): **{c['chosen']}** ({'; '.join(parts)}); every "
                     "cell uses it")
    lines += ["", "| sampler | NFE | objective | FID untuned | FID tuned | change (+/- bootstrap SE) | headroom vs "
                  "floor | gap closed | sFID untuned / tuned | precision u / t | recall u / t | accuracy u / t | "
                  "held-out endpoint MSE u -> t |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for sampler in s["samplers"]:
        for nfe in s["nfes"]:
            c = results["cells"][sampler].get(str(nfe))
            label = FAMILIES[sampler].label
            if c is None:
                lines.append(f"| {label} | {nfe} | not measured |" + " |" * 10)
                continue
            u, t = c["untuned"], c.get("tuned")
            if t is None:
                lines.append(f"| {label} | {nfe} | {c['objective']} | {u['fid']:.2f} | calibration failed: "
                             f"{c['calibration_error']} | | {c['headroom']:+.2f} | | {u['sfid']:.2f} | "
                             f"{u['precision']:.3f} | {u['recall']:.3f} | {100 * u['accuracy']:.1f}% | |")
                continue
            h = c["calibration"]
            tuned_note = " (guard: tau = t)" if h["identity"] else ""
            lines.append(
                f"| {label} | {nfe} | {c['objective']} | {u['fid']:.2f} | {t['fid']:.2f}{tuned_note} | "
                f"{c['fid_change']:+.2f} +/- {c['fid_change_se']:.2f} | {c['headroom']:+.2f} "
                f"({_pct(c['headroom_rel'])}) | {_pct(c['gap_closed'])} | {u['sfid']:.2f} / {t['sfid']:.2f} | "
                f"{u['precision']:.3f} / {t['precision']:.3f} | {u['recall']:.3f} / {t['recall']:.3f} | "
                f"{100 * u['accuracy']:.1f}% / {100 * t['accuracy']:.1f}% | "
                f"{h['endpoint_mse_untuned']:.4g} -> {h['endpoint_mse_tuned']:.4g} |")
    lines += ["", "Headroom = FID(untuned) - FID(floor); gap closed = (FID(untuned) - FID(tuned)) / headroom "
                  "(undefined when untuned is not above the floor). The change's SE resamples the x_T (paired); "
                  "a change within about 2 SE is not distinguishable from noise at this sample size.",
              "", "Not measured: " + (", ".join(results["not_measured"]) or "none"), ""]
    return "\n".join(lines)


def plot(results):
    samplers = [s for s in results["settings"]["samplers"] if results["cells"][s]]
    panels = samplers or [None]  # no measured cell at all: one panel with the floor and a note, never an empty one
    fig, axes = writer.figure(ncols=len(panels), size=(4.6, 3.6))
    floor = results.get("floor")
    for ax, sampler in zip(axes[0], panels):
        if floor:
            ax.axhline(floor["fid"], color="0.3", ls="--", lw=1,
                       label=f"floor: {FAMILIES[floor['family']].label} {floor['nfe']} ({floor['fid']:.1f})")
        if sampler is None:
            ax.text(0.5, 0.5, "no cell measured", ha="center", va="center", transform=ax.transAxes)
            continue
        cells = results["cells"][sampler]
        nfes = sorted(int(n) for n in cells)
        ax.plot(nfes, [cells[str(n)]["untuned"]["fid"] for n in nfes], "o-", color="tab:gray", label="untuned")
        tuned = [n for n in nfes if "tuned" in cells[str(n)]]
        ax.errorbar(tuned, [cells[str(n)]["tuned"]["fid"] for n in tuned],
                    yerr=[cells[str(n)]["fid_change_se"] for n in tuned], fmt="s-", color="tab:blue", capsize=3,
                    label="tuned (+/- SE of the change)")
        missing = [n for n in results["settings"]["nfes"] if str(n) not in cells]
        title = FAMILIES[sampler].label + f" (tuned: {results['objective_choice']['chosen']})"
        ax.set_title(title if not missing else f"{title}\nnot measured: NFE {', '.join(map(str, sorted(missing)))}",
                     fontsize=9)
        ax.set_xticks(sorted(set(nfes)))
    for ax in axes[0]:
        ax.set_xlabel("NFE")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"Inception FID ({results['settings']['n_samples']} samples vs "
                          f"{results['settings']['n_reference']} real)")
    fig.suptitle("Fashion-MNIST 16x16: FID vs NFE", fontsize=10)
    return fig


if __name__ == "__main__":
    main(parse_args())
