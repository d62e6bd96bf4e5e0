"""EDM's Heun sampler on the exact-score GMM: untuned vs tuned TimeTunerHeunDiscreteScheduler (Karras sigmas) vs NFE.

The testbed is the digits mixture with its exact noise prediction (`testbeds.load_gmm_model`, linear betas), so
every error is the sampler's. Heun with Karras sigmas (`use_karras_sigmas=True`, the EDM schedule) makes 2n - 1
network evaluations for n steps, so a table holds 2n - 1 taus and NFE = 2n - 1. For each n and each objective Heun
supports (``teacher_local``, ``endpoint``; the paper's eq. 9 / 10 need a grid state between evaluations and are
refused) a table is calibrated data-free against the Heun teacher at ``teacher_factor * (n - 1) + 1`` Karras steps
(each coarse interval split ``teacher_factor`` times, so its grid contains the coarse one), then every
sampler draws the same x_T and is scored by
- FD: the pixel-space Frechet distance of its samples to exact samples of the mixture;
- L2: the mean per-sample endpoint L2 distance to the many-step Heun sample from the same x_T.
The many-step Heun sampler is the floor; the FD between two exact sample sets of the same size the finite-sample
floor.

Usage: python -m benchmarks.heun_gmm --quick|--medium [--threads 1]
"""

from __future__ import annotations

import argparse
import time


from . import cli_args, evaluation, testbeds, writer

NAME = "heun_gmm"
OBJECTIVES = ("teacher_local", "endpoint")
SIZES = {
    "quick": dict(n=64, ref=256, steps=[3], objectives=["teacher_local"], floor_steps=50, teacher_factor=5,
                  calib=dict(num_samples=16, num_validation_samples=16, num_heldout_samples=16)),
    # NFE 5, 7, 11, 15, 19: both objectives at every step count; 128 calibration / validation / held-out x_T (sized
    # for a heavily shared CPU, with --budget-s).
    "medium": dict(n=2000, ref=10000, steps=[3, 4, 6, 8, 10], objectives=list(OBJECTIVES), floor_steps=200,
                   teacher_factor=20, calib=dict(num_samples=128, num_validation_samples=128,
                                                 num_heldout_samples=128)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def make_heun(noise_config):
    from diffusers_timetuner import TimeTunerHeunDiscreteScheduler

    return TimeTunerHeunDiscreteScheduler(**noise_config, use_karras_sigmas=True)


def main(args) -> dict:
    from diffusers_timetuner.calibration import calibrate

    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    size = SIZES[args.size]
    tb = testbeds.load_testbed("gmm", device)
    exact = tb.exact_sampler(size["ref"], args.seed + 1)
    exact2 = tb.exact_sampler(size["n"], args.seed + 2)
    fd = lambda x: evaluation.fd_pixels(x, exact)  # noqa: E731

    def generate(scheduler, steps):
        return evaluation.generate(tb, scheduler, steps, size["n"], args.seed, device, batch_size=size["n"])

    cli_args.log(f"{NAME}: floor = Heun (Karras) at {size['floor_steps']} steps on {size['n']} samples")
    floor = generate(make_heun(tb.noise_config), size["floor_steps"])
    results = {"settings": dict(size), "sampler": "HeunDiscreteScheduler(use_karras_sigmas=True), linear betas "
               "1e-4..0.02, epsilon", "fd_exact_vs_exact": fd(exact2),
               "floor": {"steps": size["floor_steps"], "nfe": 2 * size["floor_steps"] - 1, "fd": fd(floor)},
               "cells": []}

    def score(x):
        return {"fd": fd(x), "l2_to_floor": evaluation.endpoint_l2(x, floor)}

    for steps in size["steps"]:
        nfe = 2 * steps - 1
        if run.out_of_time(f"heun@{nfe}"):
            continue
        cell = {"steps": steps, "nfe": nfe, "untuned": score(generate(make_heun(tb.noise_config), steps)),
                "tuned": {}}
        for obj in size["objectives"]:
            if run.out_of_time(f"heun@{nfe} {obj}"):
                continue
            tick = time.perf_counter()
            result = calibrate(tb.model, make_heun(tb.noise_config), steps, objective=obj, seed=args.seed,
                               teacher_steps=size["teacher_factor"] * (steps - 1) + 1, progress=False, **size["calib"])
            out = writer.calibrated_entry(result, steps, score(generate(result.scheduler, steps)), tick)
            cell["tuned"][obj] = out
            cli_args.log(f"heun@{nfe} {obj}: FD {cell['untuned']['fd']:.4g} -> {out['fd']:.4g}, "
                         f"L2 {cell['untuned']['l2_to_floor']:.4g} -> {out['l2_to_floor']:.4g} "
                         f"({out['calibration_s']:.0f} s)")
        writer.mark_best(cell)
        results["cells"].append(cell)
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    objectives = sorted({o for c in results["cells"] for o in c["tuned"]})
    header = ["steps", "NFE", "untuned FD", *[f"{o} FD" for o in objectives], "best FD change", "untuned L2",
              *[f"{o} L2" for o in objectives], *[f"{o} held-out MSE change" for o in objectives]]
    rows = []
    for c in results["cells"]:
        t = c["tuned"]
        rows.append([c["steps"], c["nfe"], c["untuned"]["fd"], *[t[o]["fd"] if o in t else None for o in objectives],
                     None if c.get("best_fd_change") is None
                     else f"{100 * c['best_fd_change']:+.1f}% ({c['best_objective']})",
                     c["untuned"]["l2_to_floor"], *[t[o]["l2_to_floor"] if o in t else None for o in objectives],
                     *[f"{100 * t[o]['heldout_change']:+.1f}% +/- {100 * t[o]['heldout_change_se']:.1f}%"
                       + ("" if t[o]["shipped_tuned"] else " (guard: tau = t)") if o in t else None
                       for o in objectives]])
    floor = results["floor"]
    return (f"# EDM Heun (Karras sigmas) on the exact-score GMM\n\n{results['sampler']}; NFE = 2 steps - 1. "
            f"FD: pixel Frechet distance to exact mixture samples (two exact sample sets: "
            f"{results['fd_exact_vs_exact']:.4g}; Heun at {floor['steps']} steps (NFE {floor['nfe']}): "
            f"{floor['fd']:.4g}). L2: mean endpoint L2 distance to that many-step sample from the same x_T. Held-out "
            f"MSE change: calibrate's own paired check against the Heun teacher on its held-out x_T (mean +/- SE).\n\n"
            + writer.markdown_table(header, rows))


def plot(results):
    fig, axes = writer.figure(2, 1)
    cells = results["cells"]
    for k, (key, title) in enumerate((("fd", "FD to exact samples"), ("l2_to_floor", "L2 to many-step sample"))):
        ax = axes[0][k]
        ax.plot([c["nfe"] for c in cells], [c["untuned"][key] for c in cells], "o--", label="Heun untuned")
        for o in sorted({o for c in cells for o in c["tuned"]}):
            pts = [(c["nfe"], c["tuned"][o][key]) for c in cells if o in c["tuned"]]
            ax.plot(*zip(*pts), "o-", label=f"Heun {o}")
        if key == "fd":
            ax.axhline(results["fd_exact_vs_exact"], color="gray", lw=0.8, label="exact vs exact")
            ax.axhline(results["floor"]["fd"], color="gray", ls=":", label=f"{results['floor']['steps']}-step Heun")
        ax.set_xlabel("NFE")
        ax.set_yscale("log")
        ax.set_title(title)
    axes[0][0].legend(fontsize=6)
    return fig


if __name__ == "__main__":
    main(parse_args())
