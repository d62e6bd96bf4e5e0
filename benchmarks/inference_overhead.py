"""Inference overhead of a tuned scheduler: the same pipeline call with a tuned vs an untuned scheduler.

Same model, same number of steps, same inputs; the two variants are timed alternately (ABAB..., order swapped every
repetition) after warm-up, and the ratio of the medians (tuned / untuned) is reported. Also the scheduler-only cost
per step (set_timesteps + step, no network) for each sampler family, which bounds the overhead from above.
Timings are reported, never asserted on.

Usage: PYTHONPATH=src python benchmarks/inference_overhead.py --quick|--medium|--full [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

NAME = "inference_overhead"
SIZES = {
    "quick": dict(batch=4, nfe=4, reps=3, warmup=1, sched_reps=10, table="synthetic"),
    "medium": dict(batch=16, nfe=10, reps=11, warmup=1, sched_reps=100, table="calibrated", objective="paper"),
    "full": dict(batch=512, nfe=10, reps=41, warmup=3, sched_reps=500, table="calibrated", objective="default"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return common.add_common_args(parser).parse_args(argv)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_pipeline(pipe, schedulers, labels, nfe, reps, warmup, device):
    """Median seconds per call for each scheduler, timed interleaved."""
    times = {k: [] for k in schedulers}
    order = list(schedulers)
    for rep in range(warmup + reps):
        for key in (order if rep % 2 == 0 else order[::-1]):
            pipe.scheduler = schedulers[key]
            gen = torch.Generator().manual_seed(rep)
            _sync(device)
            t0 = time.perf_counter()
            pipe(class_labels=labels, num_inference_steps=nfe, generator=gen, output_type="pt")
            _sync(device)
            if rep >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


def time_scheduler_only(scheduler, nfe, shape, reps):
    """Seconds per step of set_timesteps + step with a fixed model output (no network)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    for _ in range(reps):
        scheduler.set_timesteps(nfe)
        y = x
        for t in scheduler.timesteps:
            y = scheduler.step(eps, t, y).prev_sample
    return (time.perf_counter() - t0) / (reps * nfe)


def synthetic_table(scheduler, nfe):
    """A valid tau table that differs from the grid everywhere (t + 0.25, or t - 0.25 at the top of the range)."""
    grid = common.scheduler_grid(scheduler, nfe)
    top = scheduler.config.num_train_timesteps - 1
    taus = [t + 0.25 if t < top else t - 0.25 for t in grid]
    return scheduler.with_tuned_timesteps(nfe, taus, grid=grid)


def main(args) -> dict:
    device = common.setup(args)
    run = common.Run(NAME, args, device)
    cfg = SIZES[args.size]
    testbed = common.load_testbed("mnist", device)
    nfe = cfg["nfe"]
    untuned = common.make_scheduler("ddim", testbed.noise_config)
    cal, err = None, None
    if cfg["table"] == "calibrated":
        objective = common.package_default_objective() if cfg["objective"] == "default" else cfg["objective"]
        cal, err = common.try_calibration(testbed, "ddim", nfe, device, tables_dir=run.tables_dir,
                                          use_cache=not args.no_cache, objective=objective,
                                          calib=common.calib_for(args.size, testbed.name), seed=args.seed)
    if cal is not None:
        tuned, table = cal.scheduler(testbed, "ddim"), Path(cal.path).name
    else:  # quick (CI), or the calibration failed (recorded): any valid table exercises the same code path
        tuned = synthetic_table(untuned, nfe)
        table = "synthetic (grid +/- 0.25)" + (f"; calibration failed: {err}" if err else "")
    schedulers = {"untuned": untuned, "tuned": tuned}
    pipe = testbed.pipeline.to(device)
    pipe.set_progress_bar_config(disable=True)
    labels = (torch.arange(cfg["batch"]) % testbed.num_classes).tolist()
    common.log(f"{NAME}: pipeline calls, batch {cfg['batch']}, {nfe} steps, {cfg['reps']} interleaved reps")
    with torch.no_grad():
        times = time_pipeline(pipe, schedulers, labels, nfe, cfg["reps"], cfg["warmup"], device)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["tuned"] / med["untuned"]
    sched_only = {}
    for family in common.FAMILIES:
        base = common.make_scheduler(family, testbed.noise_config)
        sched_only[family] = {k: time_scheduler_only(s, nfe, (cfg["batch"], *testbed.sample_shape),
                                                     cfg["sched_reps"])
                              for k, s in (("untuned", common.make_scheduler(family, testbed.noise_config)),
                                           ("tuned", synthetic_table(base, nfe)))}
    results = {"settings": cfg, "pipeline": {"median_s": med, "ratio_tuned_over_untuned": ratio, "times_s": times,
                                             "table": table},
               "scheduler_only_s_per_step": sched_only}
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    p = results["pipeline"]
    s = results["settings"]
    out = [f"# Inference overhead\n\nPipeline call (MNIST UNet, DDIM, batch {s['batch']}, {s['nfe']} steps, "
           f"{s['reps']} interleaved repetitions): median untuned {p['median_s']['untuned']:.4g} s, tuned "
           f"{p['median_s']['tuned']:.4g} s, **ratio {p['ratio_tuned_over_untuned']:.4f}**.\n\n"
           "Scheduler alone (set_timesteps + step, no network), microseconds per step:\n\n"]
    rows = [[common.FAMILIES[f].label, 1e6 * v["untuned"], 1e6 * v["tuned"]]
            for f, v in results["scheduler_only_s_per_step"].items()]
    out.append(common.markdown_table(["sampler", "untuned us/step", "tuned us/step"], rows))
    return "".join(out)


def plot(results):
    fig, axes = common.figure(ncols=1, nrows=1, size=(5.0, 3.4))
    ax = axes[0][0]
    t = results["pipeline"]["times_s"]
    ax.boxplot([t["untuned"], t["tuned"]])
    ax.set_xticks([1, 2], ["untuned", "tuned"])
    ax.set_ylabel("seconds per pipeline call")
    ax.set_title(f"ratio of medians {results['pipeline']['ratio_tuned_over_untuned']:.4f}", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
