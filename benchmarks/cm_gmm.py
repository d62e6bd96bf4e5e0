"""Consistency model at 1-2 steps on the GMM testbed: untuned vs tuned TimeTunerCMStochasticIterativeScheduler.

The model is the bundled consistency model of the digits mixture (`testbeds.load_gmm_cm_pipeline`: an MLP distilled
from the mixture's exact probability-flow ODE, `testbeds/gmm_cm/train.py`). For n = 1 and 2 steps and each objective a
consistency model supports (``teacher_local``, ``endpoint``; eq. 9 / 10 need a noise prediction and are refused), a
table is calibrated data-free; the teacher is the same consistency model at more steps (`calibrate`'s default for
consistency models), the guard's metric the endpoint MSE at one step and the energy distance at two (re-noising
makes two steps stochastic). Every sampler draws the same x_T and the same re-noising generator and is scored by
- FD: the pixel-space Frechet distance of its samples to exact samples of the mixture (the paper's Tab. 2 metric is
  FID; here the exact distribution is known);
- L2 to ODE: the mean per-sample distance to the exact ODE's endpoint from the same x_T (Heun on the exact denoiser,
  ``ode_steps`` Karras steps), the map a consistency model distils; at two steps the sample also depends on the
  re-noising draw.
Reference rows: the same model at 4 and 8 steps untuned, and two exact sample sets (the finite-sample floor).
Variants ``<objective>_noguard`` ship the fitted taus without the validation guard (``guard=False``), to show what
the fit itself does where the guard keeps tau = t.

Usage: python -m benchmarks.cm_gmm --quick|--medium [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import cli_args, evaluation, writer

NAME = "cm_gmm"
OBJECTIVES = ("teacher_local", "endpoint")
SIZES = {
    "quick": dict(n=64, ref=256, steps=[1, 2], objectives=["teacher_local"], unguarded=[], reference_steps=[4],
                  ode_steps=20,
                  calib=dict(num_samples=16, num_validation_samples=16, num_heldout_samples=16)),
    "medium": dict(n=2000, ref=10000, steps=[1, 2], objectives=list(OBJECTIVES), unguarded=list(OBJECTIVES),
                   reference_steps=[4, 8],
                   ode_steps=200, calib=dict(num_samples=128, num_validation_samples=128,
                                             num_heldout_samples=128)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


@torch.no_grad()
def exact_ode_endpoint(mixture, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Heun on the exact probability-flow ODE from x = sigma_max * noise down the given sigmas (then to 0)."""
    from diffusers_timetuner.testbeds.gmm_cm.train import exact_denoiser, heun_step

    x = noise.reshape(noise.shape[0], -1).double() * float(sigmas[0])
    ones = torch.ones(x.shape[0], dtype=torch.float64)
    for hi, lo in zip(sigmas[:-1], sigmas[1:]):
        x = heun_step(mixture, x, ones * float(hi), ones * float(lo))
    x = exact_denoiser(mixture, x, ones * float(sigmas[-1]))  # the last sigma (0.002) to the data
    return x.reshape(noise.shape).float()


def main(args) -> dict:
    from diffusers_timetuner import Denoiser, TimeTunerCMStochasticIterativeScheduler
    from diffusers_timetuner.calibration import calibrate
    from diffusers_timetuner.sampling import sample
    from diffusers_timetuner.testbeds import GMM_CM_MODEL_ID, load_gmm_cm_pipeline, load_gmm_model
    from diffusers_timetuner.testbeds.gmm_cm.train import karras_sigmas

    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    size = SIZES[args.size]
    pipe = load_gmm_cm_pipeline(device)
    model, config = pipe.unet, pipe.scheduler.config
    mixture = load_gmm_model()
    den = Denoiser(model)
    noise = evaluation.seeded_noise(size["n"], (1, 8, 8), args.seed)
    exact = mixture.sample_data(size["ref"], torch.Generator().manual_seed(args.seed + 1))
    exact2 = mixture.sample_data(size["n"], torch.Generator().manual_seed(args.seed + 2))
    cli_args.log(f"{NAME}: exact ODE endpoints ({size['ode_steps']} Heun steps) of {size['n']} x_T")
    ode = exact_ode_endpoint(mixture, noise, karras_sigmas(size["ode_steps"]).flip(0))

    def draw(scheduler, steps):
        return sample(den, scheduler, noise.to(device), steps,
                      generator=torch.Generator().manual_seed(args.seed + 3)).float().cpu()

    def score(x):
        return {"fd": evaluation.fd_pixels(x, exact), "l2_to_ode": evaluation.endpoint_l2(x, ode)}

    untuned = lambda: TimeTunerCMStochasticIterativeScheduler.from_config(config)  # noqa: E731
    results = {"settings": dict(size), "model_id": GMM_CM_MODEL_ID,
               "fd_exact_vs_exact": evaluation.fd_pixels(exact2, exact),
               "ode_endpoint": {"steps": size["ode_steps"], "fd": evaluation.fd_pixels(ode, exact)},
               "reference": [{"steps": s, **score(draw(untuned(), s))} for s in size["reference_steps"]],
               "cells": []}
    for steps in size["steps"]:
        if run.out_of_time(f"cm@{steps}"):
            continue
        cell = {"steps": steps, "nfe": steps, "untuned": score(draw(untuned(), steps)), "tuned": {}}
        variants = [(o, o, True) for o in size["objectives"]] + [(f"{o}_noguard", o, False) for o in size["unguarded"]]
        for key, obj, guard in variants:
            if run.out_of_time(f"cm@{steps} {key}"):
                continue
            tick = time.perf_counter()
            result = calibrate(model, untuned(), steps, objective=obj, seed=args.seed, progress=False, guard=guard,
                               model_id=GMM_CM_MODEL_ID, **size["calib"])
            out = writer.calibrated_entry(result, steps, score(draw(result.scheduler, steps)), tick)
            out["teacher_steps"] = result.reports[steps].heldout.get("teacher_steps")
            cell["tuned"][key] = out
            cli_args.log(f"cm@{steps} {key}: FD {cell['untuned']['fd']:.4g} -> {out['fd']:.4g}, L2 to ODE "
                         f"{cell['untuned']['l2_to_ode']:.4g} -> {out['l2_to_ode']:.4g}, taus {out['taus']} "
                         f"(grid {out['grid']}; {out['calibration_s']:.0f} s)")
        writer.mark_best(cell)
        results["cells"].append(cell)
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    objectives = sorted({o for c in results["cells"] for o in c["tuned"]})
    header = ["steps (NFE)", "untuned FD", *[f"{o} FD" for o in objectives], "best FD change", "untuned L2 to ODE",
              *[f"{o} L2 to ODE" for o in objectives], *[f"{o} held-out change" for o in objectives],
              *[f"{o} taus (grid)" for o in objectives]]
    rows = []
    for c in results["cells"]:
        t = c["tuned"]
        rows.append([c["steps"], c["untuned"]["fd"], *[t[o]["fd"] if o in t else None for o in objectives],
                     None if c.get("best_fd_change") is None
                     else f"{100 * c['best_fd_change']:+.1f}% ({c['best_objective']})",
                     c["untuned"]["l2_to_ode"], *[t[o]["l2_to_ode"] if o in t else None for o in objectives],
                     *[f"{100 * t[o]['heldout_change']:+.1f}% +/- {100 * t[o]['heldout_change_se']:.1f}% "
                       f"({t[o]['heldout_metric']})" + ("" if t[o]["shipped_tuned"] else ", guard: tau = t")
                       if o in t else None for o in objectives],
                     *[(", ".join(f"{v:.1f}" for v in t[o]["taus"]) + " (" + ", ".join(f"{v:.1f}" for v in
                        t[o]["grid"]) + ")") if o in t else None for o in objectives]])
    ref = "; ".join(f"{r['steps']} steps: FD {r['fd']:.4g}, L2 to ODE {r['l2_to_ode']:.4g}"
                    for r in results["reference"])
    return (f"# Consistency model at 1-2 steps on the GMM testbed\n\nModel `{results['model_id']}` (consistency "
            f"distillation from the mixture's exact ODE, `testbeds/gmm_cm/`), `CMStochasticIterativeScheduler` "
            f"(taus in 250 log sigma units). FD: pixel Frechet distance to exact mixture samples (two exact sample "
            f"sets: {results['fd_exact_vs_exact']:.4g}; the exact ODE's endpoints from the same x_T: "
            f"{results['ode_endpoint']['fd']:.4g}). L2 to ODE: mean distance to the exact ODE's endpoint from the "
            f"same x_T. Untuned at more steps: {ref}. Held-out change: calibrate's own paired check against its "
            f"teacher (the same model at more steps) on its held-out x_T (mean +/- SE).\n\n"
            + writer.markdown_table(header, rows))


def plot(results):
    fig, axes = writer.figure(2, 1)
    for k, (key, title) in enumerate((("fd", "FD to exact samples"), ("l2_to_ode", "L2 to the exact ODE endpoint"))):
        ax = axes[0][k]
        cells = results["cells"]
        ax.plot([c["steps"] for c in cells] + [r["steps"] for r in results["reference"]],
                [c["untuned"][key] for c in cells] + [r[key] for r in results["reference"]], "o--", label="untuned")
        for o in sorted({o for c in cells for o in c["tuned"]}):
            pts = [(c["steps"], c["tuned"][o][key]) for c in cells if o in c["tuned"]]
            ax.plot(*zip(*pts), "s", label=f"tuned: {o}")
        if key == "fd":
            ax.axhline(results["fd_exact_vs_exact"], color="gray", lw=0.8, label="exact vs exact")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("CM steps (NFE)")
        ax.set_title(title)
    axes[0][0].legend(fontsize=6)
    return fig


if __name__ == "__main__":
    main(parse_args())
