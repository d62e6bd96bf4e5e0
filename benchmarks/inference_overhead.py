"""Inference overhead of a tuned scheduler: the same pipeline call with a tuned vs an untuned scheduler.

Same model, number of steps and inputs; the two variants are timed alternately (order swapped every repetition)
after warm-up. Each repetition gives a paired ratio (tuned / untuned of that repetition), so load that drifts
between repetitions cancels; the script reports their median with a seeded bootstrap 95% confidence interval, and
the ratio of the medians. It also times the scheduler alone (set_timesteps + step, no network) for each sampler
family and for the pipeline's own two schedulers. That gives an analytic bound that does not depend on the
network's timing noise: 1 + (tuned - untuned scheduler seconds per step) / (untuned pipeline seconds per step),
the overhead the scheduler itself can add. Timings are reported, never asserted on.

The overhead per step is a fixed cost of the scheduler, so a smaller batch (a shorter network step) makes the
ratio a stricter test; --medium uses batch 4 to fit many repetitions into about a minute on a CPU.

Usage: python -m benchmarks.inference_overhead --quick|--medium|--full [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import cli_args, families, table_cache, testbeds, writer

NAME = "inference_overhead"
TARGET = 1.01  # target: tuned / untuned pipeline call <= 1.01
# reps: interleaved pipeline repetitions, one tuned and one untuned call each (even, so both orders count equally);
# sched_rounds x sched_reps: sampling loops per scheduler in the scheduler-only timing, interleaved by round;
# bootstrap: resamples of the repetitions.
SIZES = {
    "quick": dict(batch=4, nfe=4, reps=4, warmup=1, sched_rounds=3, sched_reps=5, bootstrap=2000,
                  table="synthetic"),
    "medium": dict(batch=4, nfe=10, reps=40, warmup=2, sched_rounds=10, sched_reps=20, bootstrap=2000,
                   table="calibrated", objective="paper"),
    "full": dict(batch=512, nfe=10, reps=40, warmup=3, sched_rounds=20, sched_reps=25, bootstrap=2000,
                 table="calibrated", objective="default"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_pipeline(pipe, schedulers, labels, nfe, reps, warmup, device):
    """Seconds per call for each scheduler, timed interleaved: repetition r runs the variants in `schedulers` order
    for even r and in reverse for odd r. Returns (times per key, which key ran first in each timed repetition)."""
    times = {k: [] for k in schedulers}
    first = []
    order = list(schedulers)
    for rep in range(warmup + reps):
        keys = order if rep % 2 == 0 else order[::-1]
        for key in keys:
            pipe.scheduler = schedulers[key]
            gen = torch.Generator().manual_seed(rep)
            _sync(device)
            t0 = time.perf_counter()
            pipe(class_labels=labels, num_inference_steps=nfe, generator=gen, output_type="pt")
            _sync(device)
            if rep >= warmup:
                times[key].append(time.perf_counter() - t0)
        if rep >= warmup:
            first.append(keys[0])
    return times, first


def paired_ratio_stats(untuned, tuned, resamples: int, seed: int) -> dict:
    """Median of the per-repetition ratios tuned / untuned and its percentile bootstrap 95% interval (seeded)."""
    ratios = np.asarray(tuned, dtype=np.float64) / np.asarray(untuned, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(ratios[rng.integers(0, len(ratios), size=(resamples, len(ratios)))], axis=1)
    lo, hi = np.percentile(medians, [2.5, 97.5])
    return {"paired_ratios": ratios.tolist(), "median_paired_ratio": float(np.median(ratios)),
            "paired_ratio_ci95": [float(lo), float(hi)],
            "bootstrap": {"resamples": resamples, "seed": seed, "statistic": "median of the paired ratios",
                          "interval": "percentile, 2.5 and 97.5"}}


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


def time_schedulers_interleaved(schedulers, nfe, shape, rounds, reps):
    """Median over `rounds` of `time_scheduler_only` for each scheduler, the order alternating by round (after one
    untimed round of warm-up)."""
    for s in schedulers.values():
        time_scheduler_only(s, nfe, shape, 1)
    per_round = {k: [] for k in schedulers}
    order = list(schedulers)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            per_round[key].append(time_scheduler_only(schedulers[key], nfe, shape, reps))
    return {k: statistics.median(v) for k, v in per_round.items()}


def synthetic_table(scheduler, nfe):
    """A valid tau table that differs from the grid everywhere (t + 0.25, or t - 0.25 at the top of the range)."""
    grid = families.scheduler_grid(scheduler, nfe)
    top = scheduler.config.num_train_timesteps - 1
    taus = [t + 0.25 if t < top else t - 0.25 for t in grid]
    return scheduler.with_tuned_timesteps(nfe, taus, grid=grid)


def main(args) -> dict:
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    cfg = SIZES[args.size]
    testbed = testbeds.load_testbed("mnist", device)
    nfe = cfg["nfe"]
    untuned = families.make_scheduler("ddim", testbed.noise_config)
    cal, err = None, None
    if cfg["table"] == "calibrated":
        objective = table_cache.package_default_objective() if cfg["objective"] == "default" else cfg["objective"]
        cal, err = table_cache.try_calibration(testbed, "ddim", nfe, device, tables_dir=run.tables_dir,
                                               use_cache=not args.no_cache, objective=objective,
                                               calib=table_cache.calib_for(args.size, testbed.name), seed=args.seed)
    if cal is not None:
        tuned, table = cal.scheduler(testbed, "ddim"), Path(cal.path).name
    else:  # quick (CI), or the calibration failed (recorded): any valid table exercises the same code path
        tuned = synthetic_table(untuned, nfe)
        table = "synthetic (grid +/- 0.25)" + (f"; calibration failed: {err}" if err else "")
    schedulers = {"untuned": untuned, "tuned": tuned}
    pipe = testbed.pipeline.to(device)
    pipe.set_progress_bar_config(disable=True)
    labels = (torch.arange(cfg["batch"]) % testbed.num_classes).tolist()
    cli_args.log(f"{NAME}: pipeline calls, batch {cfg['batch']}, {nfe} steps, {cfg['reps']} interleaved reps")
    with torch.no_grad():
        times, first = time_pipeline(pipe, schedulers, labels, nfe, cfg["reps"], cfg["warmup"], device)
    med = {k: statistics.median(v) for k, v in times.items()}
    pipeline = {"median_s": med, "ratio_tuned_over_untuned": med["tuned"] / med["untuned"], "times_s": times,
                "first_in_rep": first, "table": table, "untuned_s_per_step": med["untuned"] / nfe}
    pipeline.update(paired_ratio_stats(times["untuned"], times["tuned"], cfg["bootstrap"], args.seed))
    # diagnostic: a systematic "first / second call of a repetition" effect shows as two different medians here
    # (it cancels between the two orders, but widens the interval)
    pipeline["median_paired_ratio_by_first"] = {
        k: statistics.median(r for r, f in zip(pipeline["paired_ratios"], first) if f == k) for k in schedulers
    }

    shape = (cfg["batch"], *testbed.sample_shape)
    cli_args.log(f"{NAME}: scheduler-only timings ({cfg['sched_rounds']} x {cfg['sched_reps']} loops each)")
    # the bound: the pipeline's own two schedulers (its table), same batch shape, no network
    own = time_schedulers_interleaved(schedulers, nfe, shape, cfg["sched_rounds"], cfg["sched_reps"])
    diff = own["tuned"] - own["untuned"]
    bound = {"family": "ddim", "scheduler_s_per_step": own, "tuned_minus_untuned_s_per_step": diff,
             "pipeline_untuned_s_per_step": pipeline["untuned_s_per_step"],
             "ratio_bound": 1.0 + diff / pipeline["untuned_s_per_step"]}
    sched_only = {}
    for family in families.VP_FAMILIES:
        pair = {"untuned": families.make_scheduler(family, testbed.noise_config),
                "tuned": synthetic_table(families.make_scheduler(family, testbed.noise_config), nfe)}
        sched_only[family] = time_schedulers_interleaved(pair, nfe, shape, cfg["sched_rounds"], cfg["sched_reps"])
    results = {"settings": cfg, "target": TARGET, "pipeline": pipeline, "scheduler_bound": bound,
               "scheduler_only_s_per_step": sched_only}
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    p, s, b = results["pipeline"], results["settings"], results["scheduler_bound"]
    lo, hi = p["paired_ratio_ci95"]
    n = len(p["paired_ratios"])
    out = [f"# Inference overhead\n\nPipeline call (MNIST UNet, DDIM, batch {s['batch']}, {s['nfe']} steps, {n} "
           f"interleaved repetitions, order alternating): median untuned {p['median_s']['untuned']:.4g} s, tuned "
           f"{p['median_s']['tuned']:.4g} s.\n\n"]
    out.append(writer.markdown_table(["statistic", "tuned / untuned"], [
        [f"median of the {n} paired ratios (per repetition)", f"{p['median_paired_ratio']:.4f}"],
        [f"bootstrap 95% CI of that median ({p['bootstrap']['resamples']} resamples, seed "
         f"{p['bootstrap']['seed']})", f"[{lo:.4f}, {hi:.4f}]"],
        ["ratio of the medians", f"{p['ratio_tuned_over_untuned']:.4f}"],
        ["scheduler-only bound 1 + (tuned - untuned scheduler s/step) / (untuned pipeline s/step)",
         f"{b['ratio_bound']:.5f}"],
    ]))
    out.append(f"\nThe bound uses the pipeline's own two schedulers (table: {p['table']}) on the same batch shape "
               f"without the network: {1e6 * b['scheduler_s_per_step']['untuned']:.1f} vs "
               f"{1e6 * b['scheduler_s_per_step']['tuned']:.1f} us per step, against "
               f"{1e3 * b['pipeline_untuned_s_per_step']:.1f} ms per untuned pipeline step. Beyond the scheduler the "
               "two calls run the same code (the sampling loop hands the network a float (B,) timestep tensor in "
               "both; only its values differ). Median paired ratio by the variant that ran first in the repetition: "
               f"untuned first {p['median_paired_ratio_by_first']['untuned']:.4f}, tuned first "
               f"{p['median_paired_ratio_by_first']['tuned']:.4f} (a difference is an order effect, which the "
               f"alternation cancels but which widens the interval). Target <= {results['target']}: "
               f"{verdict(results)}.\n\n")
    out.append("Scheduler alone (set_timesteps + step, no network; synthetic table grid +/- 0.25 for the tuned "
               f"column; median of {s['sched_rounds']} interleaved rounds of {s['sched_reps']} sampling loops), "
               "microseconds per step:\n\n")
    rows = [[families.FAMILIES[f].label, 1e6 * v["untuned"], 1e6 * v["tuned"], 1e6 * (v["tuned"] - v["untuned"])]
            for f, v in results["scheduler_only_s_per_step"].items()]
    out.append(writer.markdown_table(["sampler", "untuned us/step", "tuned us/step", "tuned - untuned"], rows))
    return "".join(out)


def verdict(results) -> str:
    """met when the whole 95% interval is <= the target, missed when all of it is above, otherwise unresolved."""
    lo, hi = results["pipeline"]["paired_ratio_ci95"]
    target = results.get("target", TARGET)
    if hi <= target:
        return "met"
    if lo > target:
        return "missed"
    return f"unresolved (CI straddles {target})"


def plot(results):
    fig, axes = writer.figure(ncols=2, nrows=1, size=(4.6, 3.4))
    p, b = results["pipeline"], results["scheduler_bound"]
    target = results.get("target", TARGET)
    ax = axes[0][0]
    r = p["paired_ratios"]
    lo, hi = p["paired_ratio_ci95"]
    ax.plot(range(1, len(r) + 1), r, "o", ms=3, color="tab:blue", label="paired ratio per repetition")
    ax.axhspan(lo, hi, color="tab:blue", alpha=0.2, label=f"95% CI of median [{lo:.4f}, {hi:.4f}]")
    ax.axhline(p["median_paired_ratio"], color="tab:blue", lw=1.2, label=f"median {p['median_paired_ratio']:.4f}")
    ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target}")
    ax.axhline(b["ratio_bound"], color="black", ls=":", lw=1.2, label=f"scheduler bound {b['ratio_bound']:.5f}")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("repetition")
    ax.set_ylabel("tuned / untuned call time")
    ax.set_title(f"paired ratios: {verdict(results)}", fontsize=9)
    ax.legend(fontsize=6.5, loc="best")
    ax = axes[0][1]
    t = p["times_s"]
    ax.boxplot([t["untuned"], t["tuned"]])
    ax.set_xticks([1, 2], ["untuned", "tuned"])
    ax.set_ylabel("seconds per pipeline call")
    ax.set_title(f"ratio of medians {p['ratio_tuned_over_untuned']:.4f}", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
