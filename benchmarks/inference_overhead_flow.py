"""Inference overhead on flow-matching pipelines: `StableDiffusion3Pipeline` and `FluxPipeline` calls with a tuned
`TimeTunerFlowMatchEulerDiscreteScheduler` vs Diffusers' own `FlowMatchEulerDiscreteScheduler`.

The pipelines are built offline from tiny random components (as the pipeline tests build them; prompt embeddings
passed directly). A tiny transformer makes a network step short, so a fixed per-step scheduler cost weighs more:
a stricter test than a real model. The two variants are timed exactly as `inference_overhead.py` times the other
samplers: alternating order per repetition after warm-up, one paired ratio (tuned / untuned) per repetition, their
median with a seeded percentile-bootstrap 95% interval. The tuned table differs from the grid at every step (grid
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

from . import cli_args, writer
from .inference_overhead import TARGET, paired_ratio_stats

NAME = "inference_overhead_flow"
SIZES = {
    "quick": dict(nfe=4, reps=4, warmup=1, bootstrap=2000, size=16),
    "medium": dict(nfe=10, reps=100, warmup=3, bootstrap=2000, size=32),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def _vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def build_sd3():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    g = torch.Generator().manual_seed(1)
    pe, pp = torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g)
    kwargs = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=0.5 * pe,
                  negative_pooled_prompt_embeds=0.5 * pp, guidance_scale=5.0)
    comps = dict(transformer=transformer, vae=_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline, comps, dict(shift=3.0), kwargs


def build_flux():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 7, 32, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    comps = dict(transformer=transformer, vae=_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                 tokenizer_2=None)
    config = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    return FluxPipeline, comps, config, kwargs


def time_pair(pipe, schedulers, call, reps, warmup):
    """Seconds per call for each scheduler, the order alternating by repetition (as `inference_overhead`)."""
    times = {k: [] for k in schedulers}
    order = list(schedulers)
    for rep in range(warmup + reps):
        for key in (order if rep % 2 == 0 else order[::-1]):
            pipe.scheduler = schedulers[key]
            t0 = time.perf_counter()
            call(pipe, rep)
            if rep >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


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


def measure(name, builder, cfg, seed):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler

    cls, comps, sched_config, kwargs = builder()
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
    cli_args.log(f"{NAME}: {name}, {nfe} steps, {size}x{size}, {cfg['reps']} interleaved reps")
    times = time_pair(pipe, {"untuned": untuned, "tuned": tuned}, call, cfg["reps"], cfg["warmup"])
    if [round(float(t), 3) for t in tuned.timesteps] != [round(t, 3) for t in taus]:  # the table really ran
        raise RuntimeError(f"{name}: the tuned scheduler ran {tuned.timesteps.tolist()}, not its table {taus}.")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"pipeline": cls.__name__, "scheduler_config": sched_config, "mu": mu, "nfe": nfe, "size": size,
           "guidance_scale": kwargs.get("guidance_scale"), "grid": grid, "taus": taus, "times_s": times,
           "median_s": med, "ratio_of_medians": med["tuned"] / med["untuned"]}
    out.update(paired_ratio_stats(times["untuned"], times["tuned"], cfg["bootstrap"], seed))
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
    results = {"settings": cfg, "target": TARGET,
               "pipelines": {"sd3": measure("StableDiffusion3Pipeline", build_sd3, cfg, args.seed),
                             "flux": measure("FluxPipeline", build_flux, cfg, args.seed)}}
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    rows = []
    for key, r in results["pipelines"].items():
        lo, hi = r["paired_ratio_ci95"]
        rows.append([r["pipeline"], r["nfe"], f"{1e3 * r['median_s']['untuned']:.2f}",
                     f"{1e3 * r['median_s']['tuned']:.2f}", f"{r['median_paired_ratio']:.4f}",
                     f"[{lo:.4f}, {hi:.4f}]", f"{r['ratio_of_medians']:.4f}", f"{r['ratio_bound']:.5f}",
                     f"{1e6 * r['scheduler_s_per_step']['untuned']:.0f} / "
                     f"{1e6 * r['scheduler_s_per_step']['tuned']:.0f}",
                     r["verdict"]])
    n = results["settings"]["reps"]
    return ("# Inference overhead: flow-matching pipelines\n\nTuned `TimeTunerFlowMatchEulerDiscreteScheduler` "
            "(every tau off the grid by 2.5) vs Diffusers' `FlowMatchEulerDiscreteScheduler`, tiny offline "
            f"components, {n} interleaved repetitions per pipeline, order alternating; SD3 with guidance 5.0 and "
            "shift 3.0, Flux with its dynamic shift. Target: tuned / untuned <= "
            f"{results['target']} (met when the whole 95% interval is below it).\n\n"
            + writer.markdown_table(["pipeline", "steps", "untuned ms", "tuned ms", "median paired ratio",
                                     "bootstrap 95% CI", "ratio of medians", "scheduler-only bound",
                                     "scheduler us/step untuned / tuned", "target"], rows)
            + "\nThe scheduler-only bound is 1 + (tuned - untuned scheduler seconds per step, set_timesteps + step "
            "on the pipeline's latent shape without the network) / (untuned pipeline seconds per step): the overhead "
            "the scheduler itself can add, free of the network's timing noise on a shared CPU.\n")


def plot(results):
    fig, axes = writer.figure(ncols=len(results["pipelines"]), nrows=1, size=(4.4, 3.3))
    for k, r in enumerate(results["pipelines"].values()):
        ax = axes[0][k]
        ratios = r["paired_ratios"]
        lo, hi = r["paired_ratio_ci95"]
        ax.plot(range(1, len(ratios) + 1), ratios, "o", ms=3, label="paired ratio per repetition")
        ax.axhspan(lo, hi, alpha=0.2, label=f"95% CI [{lo:.4f}, {hi:.4f}]")
        ax.axhline(results["target"], color="tab:red", ls="--", lw=1, label=f"target {results['target']}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.axhline(r["ratio_bound"], color="black", ls=":", lw=1.2, label=f"scheduler bound {r['ratio_bound']:.4f}")
        ax.set_title(f"{r['pipeline']}: {r['verdict']}", fontsize=8)
        ax.set_xlabel("repetition")
        ax.set_ylabel("tuned / untuned call time")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
