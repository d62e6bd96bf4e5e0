#!/usr/bin/env python
"""Rebuild the bundled tuned schedules and write each entry's PROVENANCE.md.

The entries are package data, src/diffusers_timetuner/tuned_schedules/<name>/ (shipped in the wheel, found there in a
checkout and an editable install); this folder holds the recipe (this script), NOTES.md and rejected/.

    PYTHONPATH=src OMP_NUM_THREADS=1 python tuned_schedules/build.py gmm-digits-ddim-10-g1
    PYTHONPATH=src OMP_NUM_THREADS=1 python tuned_schedules/build.py mnist-ddim-5-g1

Entries on the bundled MNIST model run the package's CLI (``python -m diffusers_timetuner.cli.calibrate``) unchanged.
The exact-score GMM entry calls the library API instead: the CLI's ``--pretrained_model_name_or_path`` loads a
Diffusers pipeline folder (``model_index.json``) and the bundled GMM testbed is a bare model folder (config.json +
weights) with no pipeline index, so the CLI cannot load it (reported as a gap to the calibration area).
After a run: ``python -m diffusers_timetuner.hub --write-index`` regenerates the entries' index (README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUNDLED = REPO / "src" / "diffusers_timetuner" / "tuned_schedules"  # where the shipped entries live

# name -> (kind, arguments). "cli": arguments of `python -m diffusers_timetuner.cli.calibrate`; "gmm": calibrate()
# keyword arguments for the bundled exact-score GMM pipeline.
ENTRIES = {
    "gmm-digits-ddim-10-g1": ("gmm", dict(scheduler="ddim", num_inference_steps=10, objective="endpoint",
                                          num_samples=256, batch_size=256, num_validation_samples=128,
                                          num_heldout_samples=512, teacher="same", teacher_steps=200, seed=0)),
    # The tau entries were built with the same-sampler teacher, the default before the DPM-Solver++ teacher.
    "mnist-ddim-5-g1": ("cli", [
        "--pretrained_model_name_or_path", "mnist", "--num_inference_steps", "5", "--objective", "endpoint",
        "--num_samples", "64", "--batch_size", "64", "--num_validation_samples", "32", "--num_heldout_samples", "128",
        "--teacher", "same", "--teacher_steps", "50", "--seed", "0", "--no_progress"]),
    # (built when the CLI's preset held 32 / 16 / 32 samples and a 50-step teacher: pinned here)
    "mnist-ddim-10-g1": ("cli", [
        "--pretrained_model_name_or_path", "mnist", "--num_inference_steps", "10", "--teacher", "same",
        "--num_samples", "32", "--batch_size", "32", "--num_validation_samples", "16", "--num_heldout_samples", "32",
        "--teacher_steps", "50", "--no_progress"]),
    # Flow-matching MNIST testbed, Euler at 10 steps; the endpoint objective, as on the exact flow GMM where it
    # gave the lowest FD at every NFE (benchmarks/flow_gmm.py).
    "mnist-flow-euler-10-g1": ("cli", [
        "--pretrained_model_name_or_path", "mnist_flow", "--scheduler", "flow_euler", "--num_inference_steps", "10",
        "--objective", "endpoint", "--num_samples", "64", "--batch_size", "64", "--num_validation_samples", "64",
        "--num_heldout_samples", "128", "--teacher", "same", "--teacher_steps", "100", "--seed", "0", "--no_progress"]),
    # the grid modes (the learned grid is in the table: plain set_timesteps(10) samples on it); built when the
    # search's only criterion was the mean endpoint error, pinned here so that a rebuild reproduces them
    "gmm-digits-ddim-10-grid-g1": ("gmm", dict(scheduler="ddim", num_inference_steps=10, tune="grid",
                                               grid_search_criterion="mean", num_samples=256, batch_size=256,
                                               num_validation_samples=128, num_heldout_samples=512, seed=0)),
    "gmm-digits-ddim-10-grid-tau-g1": ("gmm", dict(scheduler="ddim", num_inference_steps=10, tune="grid+tau",
                                                   grid_search_criterion="mean", num_samples=256, batch_size=256,
                                                   num_validation_samples=128, num_heldout_samples=512, seed=0)),
    # Grid modes on the bundled MNIST UNet (the eps model, pinned: the CLI's default model is the flow MNIST UNet).
    # The per-sample endpoint error is heavy-tailed on this model, so the search scores grids by the mean log error
    # (docs/facts.md, 6); a 40-step DPM-Solver++ teacher (0.045 from an 80-step run; calibration/config.py).
    # DDIM at 10 steps (the pipeline's scheduler, "leading" default grid [900, ..., 0]):
    # with 32 validation x_T the learned grid's -33% validation change was 1.2 paired SE, refused (run.log in
    # rejected/mnist-ddim-10-grid-g1-32val/); 128 validation / 128 held-out x_T give the guard the power to judge it.
    "mnist-ddim-10-grid-g1": ("cli", [
        "--pretrained_model_name_or_path", "mnist", "--num_inference_steps", "10", "--tune", "grid",
        "--grid_search_criterion", "log_mean", "--num_samples", "32", "--batch_size", "32",
        "--num_validation_samples", "128", "--num_heldout_samples", "128", "--teacher_steps", "40", "--seed", "0",
        "--no_progress"]),
    "mnist-ddim-10-grid-tau-g1": ("cli", [
        "--pretrained_model_name_or_path", "mnist", "--num_inference_steps", "10", "--tune", "grid+tau",
        "--grid_search_criterion", "log_mean", "--num_samples", "32", "--batch_size", "32",
        "--num_validation_samples", "128", "--num_heldout_samples", "128", "--teacher_steps", "40", "--seed", "0",
        "--no_progress"]),
    # DPM-Solver++ multistep at 5 steps (time-uniform default grid [830, 664, 498, 332, 166]), 32 validation x_T:
    "mnist-dpmpp-5-grid-g1": ("cli", [
        "--pretrained_model_name_or_path", "mnist", "--scheduler", "dpmsolver", "--num_inference_steps", "5",
        "--tune", "grid", "--grid_search_criterion", "log_mean", "--num_samples", "32", "--batch_size", "32",
        "--num_validation_samples", "32", "--num_heldout_samples", "64", "--teacher_steps", "40", "--seed", "0",
        "--no_progress"]),
    "mnist-dpmpp-5-grid-tau-g1": ("cli", [
        "--pretrained_model_name_or_path", "mnist", "--scheduler", "dpmsolver", "--num_inference_steps", "5",
        "--tune", "grid+tau", "--grid_search_criterion", "log_mean", "--num_samples", "32", "--batch_size", "32",
        "--num_validation_samples", "32", "--num_heldout_samples", "64", "--teacher_steps", "40", "--seed", "0",
        "--no_progress"]),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (shared with other jobs), torch threads {torch.get_num_threads()}, no GPU"


def versions() -> dict:
    from diffusers_timetuner.cli.calibrate import versions as cli_versions

    return cli_versions()


def rebuild_command(name: str) -> str:
    """The command that rebuilds entry ``name`` into the package's tuned_schedules/."""
    kind, spec = ENTRIES[name]
    if kind == "gmm":
        return f"PYTHONPATH=src OMP_NUM_THREADS=1 python tuned_schedules/build.py {name}"
    return ("PYTHONPATH=src OMP_NUM_THREADS=1 python -m diffusers_timetuner.cli.calibrate "
            + " ".join(shlex.quote(a) for a in spec) + f" --output_dir {BUNDLED.relative_to(REPO)}/{name}")


def run_gmm(out: Path, kwargs: dict) -> str:
    from diffusers_timetuner.calibration import calibrate
    from diffusers_timetuner.testbeds import GMM_MODEL_ID, load_gmm_pipeline

    kw = dict(kwargs)
    result = calibrate(load_gmm_pipeline(), kw.pop("scheduler"), kw.pop("num_inference_steps"), progress=False,
                       model_id=GMM_MODEL_ID, **kw)
    command = rebuild_command(out.name)
    result.save(str(out), extra={"command": command, "versions": versions(), "num_processes": 1,
                                 "calibrate_kwargs": kwargs})
    return command


def run_cli(out: Path, args: list) -> str:
    argv = [sys.executable, "-m", "diffusers_timetuner.cli.calibrate", *args, "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run(argv, check=True, cwd=REPO, env=env)
    return rebuild_command(out.name)


PIPELINE_LOADERS = {"diffusers-timetuner/bundled-gmm-digits": "load_gmm_pipeline",
                    "diffusers-timetuner/bundled-mnist": "load_mnist_pipeline",
                    "diffusers-timetuner/bundled-mnist-flow": "load_mnist_flow_pipeline"}
CHECK_NAME = "heldout_check.json"
# Held-out samples tests/test_hub_bundled.py recomputes per model (None: the whole held-out set). The exact GMM is
# cheap (512 samples in a few seconds); the MNIST UNet with a 50-step teacher is not: its first 16 held-out x_T keep
# the test within ~20 s per entry on 1 CPU thread.
CHECK_SUBSET = {"diffusers-timetuner/bundled-gmm-digits": None, "diffusers-timetuner/bundled-mnist": 16,
                "diffusers-timetuner/bundled-mnist-flow": 32}


@torch.no_grad()
def heldout_errors(scheduler, n: int, num_samples: int | None = None) -> dict:
    """Recompute the calibration's held-out endpoint errors of table n from what the entry records.

    Same recipe as ``calibrate()`` (``calibration/report.py: evaluate_heldout``), re-implemented per sample: held-out
    x_T = ``torch.randn((N, *shape), generator=seed + 2)`` (N = recorded ``num_heldout_samples``), conditions cycled
    as the calibration cycled them (checked against the recorded description), the untuned sampler of the same
    config and the recorded teacher step count through the inference loop (``sampling.sample_trajectory``), in
    batches of the recorded batch size. Error of a sample: squared distance (sum over pixels, float64) between its
    final sample and the teacher's. ``num_samples``: only the first k of the N x_T.

    Returns the mean errors untuned / tuned and paired statistics of (tuned - untuned) per sample.
    """
    import copy

    from diffusers_timetuner import testbeds
    from diffusers_timetuner.calibration.conditions import build_conditions, resolve_model
    from diffusers_timetuner.calibration.teacher import FINE_TEACHER_NAME, FineTeacher, Teacher
    from diffusers_timetuner.calibration.rollout import Rollout
    from diffusers_timetuner.calibration.families import untuned_copy
    from diffusers_timetuner.denoiser import Denoiser, slice_conditioning
    from diffusers_timetuner.sampling import init_noise_sigma, sample_trajectory

    info = scheduler.config.tuning_info[str(n)]
    if info.get("model_id") not in PIPELINE_LOADERS:
        raise ValueError(f"no bundled testbed for model {info.get('model_id')!r}: {sorted(PIPELINE_LOADERS)}")
    model, pipeline = resolve_model(getattr(testbeds, PIPELINE_LOADERS[info["model_id"]])())
    g = float(info["guidance_scale"])
    cond_set = build_conditions(model, pipeline, None, None, g, None, "cpu")
    if cond_set.description != info["conditioning"]:
        raise ValueError(f"conditioning {cond_set.description} differs from the recorded {info['conditioning']}")
    denoiser = Denoiser(model, guidance_scale=g, uncond=cond_set.uncond)
    total = int(info["num_heldout_samples"])
    k = total if num_samples is None else int(num_samples)
    shape = (int(model.config.in_channels), int(model.config.sample_size), int(model.config.sample_size))
    noise = torch.randn((total, *shape), generator=torch.Generator().manual_seed(int(info["seed"]) + 2))[:k]
    cond = cond_set.take(range(k))
    untuned = untuned_copy(scheduler)
    rollout = Rollout(denoiser, untuned, n, eta=info.get("eta"))  # the default grid: the untuned baseline
    if info.get("teacher") == FINE_TEACHER_NAME:  # the grid modes' DPM-Solver++ 2M teacher
        teacher = FineTeacher(denoiser, untuned, int(info["teacher_steps"]))
    else:
        teacher = Teacher(denoiser, untuned, int(info["teacher_steps"]), coarse_grid=rollout.grid_list)
    if teacher.num_inference_steps != int(info["teacher_steps"]):
        raise ValueError("the teacher grid differs from the recorded one")
    sigma = float(init_noise_sigma(rollout.scheduler))
    errors = {"tuned": [], "untuned": []}
    batch = int(info["batch_size"])
    for start in range(0, k, batch):
        idx = list(range(start, min(k, start + batch)))
        x, c = noise[idx], slice_conditioning(cond, idx)
        target = teacher.targets(x * sigma, sigma, c, rollout.grid_list)[-1]
        for name, sched in (("tuned", scheduler), ("untuned", rollout.scheduler)):
            final = sample_trajectory(denoiser, copy.deepcopy(sched), x, n, c, eta=rollout.eta,
                                      generator=torch.Generator().manual_seed(1))[-1]
            errors[name].append((final - target).double().pow(2).flatten(1).sum(1))
    tuned, untuned_err = torch.cat(errors["tuned"]), torch.cat(errors["untuned"])
    diff = tuned - untuned_err
    return {"num_samples": k, "endpoint_mse_untuned": float(untuned_err.mean()),
            "endpoint_mse_tuned": float(tuned.mean()), "paired_mean_diff": float(diff.mean()),
            "paired_se_diff": float(diff.std() / k ** 0.5) if k > 1 else None,
            "fraction_improved": float((diff < 0).double().mean()), "median_diff": float(diff.median())}


def write_check(out: Path) -> dict:
    """heldout_check.json: per n, the full held-out recompute (must match the calibration's record) and the figures on
    the first CHECK_SUBSET[model] held-out x_T, which the test suite recomputes."""
    from diffusers_timetuner.hub import load_tuned_scheduler

    scheduler = load_tuned_scheduler(str(out))
    check = {}
    for n, info in scheduler.config.tuning_info.items():
        full = heldout_errors(scheduler, int(n))
        rec = info["heldout"]
        for key in ("endpoint_mse_untuned", "endpoint_mse_tuned"):
            if abs(full[key] - rec[key]) > 1e-4 * abs(rec[key]):
                raise RuntimeError(f"{out.name} n={n}: recompute {key} {full[key]} != recorded {rec[key]}")
        k = CHECK_SUBSET[info["model_id"]]
        subset = full if k is None or k >= full["num_samples"] else heldout_errors(scheduler, int(n), k)
        check[n] = {"full_recompute": full, "subset": subset}
    (out / CHECK_NAME).write_text(json.dumps(check, indent=2, sort_keys=True) + "\n")
    return check


def write_provenance(out: Path, command: str, wall: float) -> None:
    """PROVENANCE.md: rebuild command, wall time, machine, versions, settings, held-out figures."""
    report = json.loads((out / "report.json").read_text())
    s = report["settings"]
    lines = [f"# {out.name}", "", "Rebuild (from the repository root):", "", "```", command, "```", "",
             f"(`python tuned_schedules/build.py {out.name}` runs it, removes the CLI's checkpoints/ and writes "
             "heldout_check.json and this file; `report.json`'s `command` is the recorded run's own, with its "
             "output folder)", "",
             f"- wall time: {wall:.0f} s ({machine()})",
             f"- versions: {json.dumps(report.get('versions', versions()))}",
             f"- model: {s['model_id']}; scheduler: {s['scheduler_class']}; guidance scale {s['guidance_scale']}",
             f"- objective {s['objective']}, strategy {s['strategy']}, optimizer {s['optimizer']}, "
             f"guard {s['guard']}; "
             f"{s['num_samples']} calibration / {s['num_validation_samples']} validation / "
             f"{s['num_heldout_samples']} held-out samples; seed {s['seed']}", "",
             "Held-out (fresh x_T drawn with seed + 2; mean over samples of the squared distance, summed over pixels, "
             "between the final sample and the teacher's final sample from the same x_T):", "",
             "| n | teacher steps | grid | tau table | untuned | tuned | change | forward samples | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, rep in sorted(report["step_counts"].items(), key=lambda kv: int(kv[0])):
        h = rep["heldout"]
        lines.append(f"| {n} | {h['teacher_steps']} | {[round(t) for t in rep['grid']]} | "
                     f"{[round(t, 2) for t in rep['taus']]} | "
                     f"{h['endpoint_mse_untuned']:.5g} | {h['endpoint_mse_tuned']:.5g} | "
                     f"{100 * h['relative_change']:+.1f}% | {rep['forward_samples']} | {rep['seconds']:.0f} |")
    check_path = out / CHECK_NAME
    if check_path.is_file():
        lines += ["", "Paired held-out statistics (per x_T: tuned error - untuned error; build.py's recompute, which "
                  "matches the record above):", "",
                  "| n | mean diff | standard error | samples improved | median diff |", "|---|---|---|---|---|"]
        for n, c in sorted(json.loads(check_path.read_text()).items(), key=lambda kv: int(kv[0])):
            f = c["full_recompute"]
            lines.append(f"| {n} | {f['paired_mean_diff']:.4g} | {f['paired_se_diff']:.3g} | "
                         f"{100 * f['fraction_improved']:.0f}% of {f['num_samples']} | {f['median_diff']:.4g} |")
    lines += ["", "Grid t_i (what the solver integrates on) and tau_i (what the network sees) per step: "
              "`report.json` (`step_counts.<n>.grid` / `taus`), plot: `calibration.png`.", ""]
    (out / "PROVENANCE.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="+", choices=sorted(ENTRIES))
    p.add_argument("--check_only", action="store_true", help="only (re)write heldout_check.json of existing entries")
    p.add_argument("--output_root", default=str(BUNDLED),
                   help="where the entry folders go (default: the package's src/diffusers_timetuner/tuned_schedules/)")
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.names:
        if args.check_only:  # also refreshes PROVENANCE.md (command and wall time of the recorded build)
            out = Path(args.output_root) / name
            print(name, write_check(out))
            write_provenance(out, rebuild_command(name), float((out / "wall_seconds.txt").read_text()))
            continue
        kind, spec = ENTRIES[name]
        out = Path(args.output_root) / name
        if out.exists():
            shutil.rmtree(out)
        tick = time.perf_counter()
        command = run_gmm(out, spec) if kind == "gmm" else run_cli(out, spec)
        wall = time.perf_counter() - tick
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the CLI's per-step checkpoints: not shipped
        (out / "wall_seconds.txt").write_text(f"{wall:.0f}\n")
        write_check(out)
        write_provenance(out, command, wall)
        print(f"{name}: {wall:.0f} s -> {out}")


if __name__ == "__main__":
    main()
