"""Inference overhead on flow-matching pipelines: `StableDiffusion3Pipeline` and `FluxPipeline` calls with a tuned
`TimeTunerFlowMatchEulerDiscreteScheduler` vs Diffusers' own `FlowMatchEulerDiscreteScheduler`.

The pipelines are built offline from random components (`diffusers_timetuner.testbeds.tiny_pipelines`, which the
pipeline tests use too; prompt embeddings passed directly) at two scales: "tiny" (a network step well under a
millisecond, so a fixed per-step scheduler cost weighs the most: a stricter test than a real model) and
"realistic" (a transformer call of tens of milliseconds on one core). Both are always reported. The two variants
are timed exactly as `inference_overhead.py` times the other samplers: alternating order per repetition after
warm-up, one paired ratio (tuned / untuned) per repetition, their median with a seeded percentile-bootstrap 95%
interval. The tuned table differs from the grid at every step (grid
+/- 2.5 timesteps, with the pipeline's own shift / mu). SD3 runs with classifier-free guidance (5.0, a batch of two
per call), Flux with its dynamic shift (mu from the image size). output_type="latent": the VAE decode, equal in
both, is left out of the ratio. Timings are reported, never asserted on.

Usage: python -m benchmarks.inference_overhead_flow --quick|--medium [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from diffusers_timetuner.testbeds import tiny_pipelines

from . import cli_args, writer
from .inference_overhead import TARGET, paired_ratio_stats

NAME = "inference_overhead_flow"
# per run size, per component scale (see `testbeds.tiny_pipelines`): steps, paired repetitions, warm-up calls,
# bootstrap resamples, image size in pixels. The tiny scale is always run (the strictest case: the network is so cheap
# that scheduler overhead weighs the most); the realistic one has a transformer call of tens of milliseconds.
SIZES = {
    "quick": dict(tiny=dict(nfe=4, reps=4, warmup=1, bootstrap=2000, size=16),
                  realistic=dict(nfe=2, reps=2, warmup=1, bootstrap=2000, size=64)),
    "medium": dict(tiny=dict(nfe=10, reps=300, warmup=5, bootstrap=2000, size=32),
                   realistic=dict(nfe=10, reps=60, warmup=3, bootstrap=2000, size=64)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def build_sd3(scale="tiny"):
    from diffusers import StableDiffusion3Pipeline

    comps, embeds = tiny_pipelines.sd3_parts(scale)
    return StableDiffusion3Pipeline, comps, dict(shift=3.0), dict(embeds, guidance_scale=5.0)


def build_flux(scale="tiny"):
    from diffusers import FluxPipeline

    comps, embeds = tiny_pipelines.flux_parts(scale)
    kwargs = dict(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"])
    config = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    return FluxPipeline, comps, config, kwargs


def time_pair(pipe, schedulers, call, reps, warmup):
    """Wall and CPU (this process) seconds per call for each scheduler, the order alternating by repetition (as
    `inference_overhead`)."""
    times = {k: [] for k in schedulers}
    cpu = {k: [] for k in schedulers}
    order = list(schedulers)
    for rep in range(warmup + reps):
        for key in (order if rep % 2 == 0 else order[::-1]):
            pipe.scheduler = schedulers[key]
            t0, c0 = time.perf_counter(), time.process_time()
            call(pipe, rep)
            if rep >= warmup:
                times[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    return times, cpu


def scheduler_seconds_per_step(schedulers, nfe, shape, set_args, rounds=10, reps=20):
    """Median over interleaved rounds of set_timesteps (with the arguments the pipeline passed) + step, no network,
    per step, for each scheduler."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    v = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    args, kwargs = set_args

    def loop(s):
        t0 = time.perf_counter()
        for _ in range(reps):
            s.set_timesteps(*args, **kwargs)
            y = x
            for t in s.timesteps:
                y = s.step(v, t, y).prev_sample
        return (time.perf_counter() - t0) / (reps * nfe)

    for s in schedulers.values():
        loop(s)  # warm-up
    per = {k: [] for k in schedulers}
    order = list(schedulers)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            per[key].append(loop(schedulers[key]))
    return {k: statistics.median(v) for k, v in per.items()}


def measure(name, builder, scale, cfg, seed):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler

    cls, comps, sched_config, kwargs = builder(scale)
    nfe, size = cfg["nfe"], cfg["size"]
    pipe = cls(**comps, scheduler=FlowMatchEulerDiscreteScheduler(**sched_config))
    pipe.set_progress_bar_config(disable=True)

    def call(p, rep):
        with torch.no_grad():
            return p(**kwargs, num_inference_steps=nfe, height=size, width=size, output_type="latent",
                     generator=torch.Generator().manual_seed(rep)).images

    # the pipeline's grid and mu, from one untuned TimeTuner run; the tuned table moves every tau by 2.5
    probe = TimeTunerFlowMatchEulerDiscreteScheduler(**sched_config)
    seen = []  # what the pipeline passes to set_timesteps (SD3 and Flux pass their own sigmas; Flux also mu)
    original = probe.set_timesteps

    @functools.wraps(original)  # pipelines inspect its signature for `sigmas` / `mu`
    def spy(*a, **k):
        seen.append((a, {n: v for n, v in k.items() if n != "device"}))
        return original(*a, **k)

    probe.set_timesteps = spy
    pipe.scheduler = probe
    latents = call(pipe, 0)
    grid, mu = probe.timesteps.tolist(), probe._mu
    taus = [t + 2.5 if t + 2.5 <= 1000 else t - 2.5 for t in grid]
    info = {"time_shift": probe.time_shift_record(mu)}
    tuned = TimeTunerFlowMatchEulerDiscreteScheduler(**sched_config).with_tuned_timesteps(nfe, taus, grid=grid,
                                                                                           info=info)
    untuned = FlowMatchEulerDiscreteScheduler(**sched_config)
    cli_args.log(f"{NAME}: {name} ({scale}), {nfe} steps, {size}x{size}, {cfg['reps']} interleaved reps")
    times, cpu = time_pair(pipe, {"untuned": untuned, "tuned": tuned}, call, cfg["reps"], cfg["warmup"])
    if [round(float(t), 3) for t in tuned.timesteps] != [round(t, 3) for t in taus]:  # the table really ran
        raise RuntimeError(f"{name}: the tuned scheduler ran {tuned.timesteps.tolist()}, not its table {taus}.")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"pipeline": cls.__name__, "scale": scale, "scheduler_config": sched_config, "mu": mu, "nfe": nfe,
           "size": size, "reps": cfg["reps"],
           "guidance_scale": kwargs.get("guidance_scale"), "grid": grid, "taus": taus, "times_s": times,
           "median_s": med, "ratio_of_medians": med["tuned"] / med["untuned"]}
    out.update(paired_ratio_stats(times["untuned"], times["tuned"], cfg["bootstrap"], seed))
    # the same statistic on this process's CPU time: blind to the time the process waits for a shared core
    cpu_stats = paired_ratio_stats(cpu["untuned"], cpu["tuned"], cfg["bootstrap"], seed)
    out["cpu_time"] = {"times_s": cpu, "median_paired_ratio": cpu_stats["median_paired_ratio"],
                       "paired_ratio_ci95": cpu_stats["paired_ratio_ci95"]}
    # the analytic bound, independent of the network's timing noise: what the scheduler itself adds per step
    own = scheduler_seconds_per_step({"untuned": FlowMatchEulerDiscreteScheduler(**sched_config), "tuned": tuned}, nfe,
                                     tuple(latents.shape), seen[-1])
    out["scheduler_s_per_step"] = own
    out["ratio_bound"] = 1.0 + (own["tuned"] - own["untuned"]) / (med["untuned"] / nfe)
    out["verdict"] = verdict(out)
    return out


def verdict(r) -> str:
    """met when the whole 95% interval is <= the target, missed when all of it is above, otherwise unresolved."""
    lo, hi = r["paired_ratio_ci95"]
    if hi <= TARGET:
        return "met"
    if lo > TARGET:
        return "missed"
    return f"unresolved (CI straddles {TARGET})"


def main(args) -> dict:
    device = cli_args.setup(args)
    if device.type != "cpu":
        raise ValueError("inference_overhead_flow times CPU calls only (no CUDA synchronisation); use --device cpu.")
    run = writer.Run(NAME, args, device)
    cfg = SIZES[args.size]
    pipelines = {}
    for scale in ("tiny", "realistic"):
        suffix = "" if scale == "tiny" else f"_{scale}"
        pipelines["sd3" + suffix] = measure("StableDiffusion3Pipeline", build_sd3, scale, cfg[scale], args.seed)
        pipelines["flux" + suffix] = measure("FluxPipeline", build_flux, scale, cfg[scale], args.seed)
    results = {"settings": cfg, "target": TARGET, "pipelines": pipelines}
    return run.write(results, markdown(results), plot(results))


def cpu_cell(stats) -> str:
    lo, hi = stats["paired_ratio_ci95"]
    return f"{stats['median_paired_ratio']:.4f} [{lo:.4f}, {hi:.4f}]"


def markdown(results) -> str:
    rows = []
    for r in results["pipelines"].values():
        lo, hi = r["paired_ratio_ci95"]
        rows.append([r["pipeline"], r["scale"], f"{r['size']}x{r['size']}", r["nfe"], r["reps"],
                     f"{1e3 * r['median_s']['untuned']:.2f}",
                     f"{1e3 * r['median_s']['tuned']:.2f}", f"{r['median_paired_ratio']:.4f}",
                     f"[{lo:.4f}, {hi:.4f}]", f"{r['ratio_of_medians']:.4f}", f"{r['ratio_bound']:.5f}",
                     f"{1e6 * r['scheduler_s_per_step']['untuned']:.0f} / "
                     f"{1e6 * r['scheduler_s_per_step']['tuned']:.0f}",
                     r["verdict"], cpu_cell(r["cpu_time"])])
    return ("# Inference overhead: flow-matching pipelines\n\nTuned `TimeTunerFlowMatchEulerDiscreteScheduler` "
            "(every tau off the grid by 2.5) vs Diffusers' `FlowMatchEulerDiscreteScheduler`, random offline "
            "components (`diffusers_timetuner.testbeds.tiny_pipelines`) at two scales: *tiny* (one transformer block, "
            "well under a millisecond per call: scheduler cost weighs the most) and *realistic* (more and wider "
            "blocks, 256 image tokens: tens of milliseconds per transformer call). Interleaved repetitions, order "
            "alternating; SD3 with guidance 5.0 (a batch of two per call) and shift 3.0, Flux with its dynamic "
            f"shift. Target: tuned / untuned <= {results['target']} (met when the whole 95% interval is below it, "
            "missed when all of it is above).\n\n"
            + writer.markdown_table(["pipeline", "scale", "image", "steps", "reps", "untuned ms", "tuned ms",
                                     "median paired ratio", "bootstrap 95% CI", "ratio of medians",
                                     "scheduler-only bound", "scheduler us/step untuned / tuned", "target",
                                     "CPU-time paired ratio [95% CI]"], rows)
            + "\nThe scheduler-only bound is 1 + (tuned - untuned scheduler seconds per step, set_timesteps + step "
            "on the pipeline's latent shape without the network) / (untuned pipeline seconds per step): the overhead "
            "the scheduler itself can add, free of the network's timing noise on a shared CPU. The target verdict "
            "is on wall time; the last column is the same statistic on the process's CPU time, which does not count "
            "the time the process waited for a shared core (informative only).\n")


def plot(results):
    fig, axes = writer.figure(ncols=2, nrows=(len(results["pipelines"]) + 1) // 2, size=(4.4, 3.3))
    for k, r in enumerate(results["pipelines"].values()):
        ax = axes[k // 2][k % 2]
        ratios = r["paired_ratios"]
        lo, hi = r["paired_ratio_ci95"]
        ax.plot(range(1, len(ratios) + 1), ratios, "o", ms=3, label="paired ratio per repetition")
        ax.axhspan(lo, hi, alpha=0.2, label=f"95% CI [{lo:.4f}, {hi:.4f}]")
        ax.axhline(results["target"], color="tab:red", ls="--", lw=1, label=f"target {results['target']}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.axhline(r["ratio_bound"], color="black", ls=":", lw=1.2, label=f"scheduler bound {r['ratio_bound']:.4f}")
        ax.set_title(f"{r['pipeline']} ({r['scale']}): {r['verdict']}", fontsize=8)
        ax.set_xlabel("repetition")
        ax.set_ylabel("tuned / untuned call time")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
