"""Flow matching on the exact-velocity Gaussian mixture: untuned vs tuned FlowMatchEuler (and UniPC) vs NFE.

The testbed is the digits mixture under the rectified flow x_s = (1 - s) x_0 + s eps with its closed-form velocity
(`testbeds.load_flow_gmm_model`), so every error is the sampler's truncation error. For each NFE and objective a table
is calibrated (data-free, or sequential from exact mixture samples for ``paper_x0``), then every sampler draws the
same x_T and is scored by
- FD: the pixel-space Frechet distance of its samples to exact samples of the mixture;
- L2: the mean per-sample endpoint L2 distance to the many-step Euler sample from the same x_T.
The many-step sampler is the floor; the FD between two exact sample sets of the same size is the finite-sample floor.

Usage: python -m benchmarks.flow_gmm --quick|--medium [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from . import cli_args, evaluation, writer

NAME = "flow_gmm"
ALL_NFES = [4, 5, 6, 8, 10, 15, 20]
SIZES = {
    "quick": dict(n=64, ref=256, nfes=[5], objectives={"teacher_local": [5]}, unipc_nfes=[5], floor_steps=50,
                  calib=dict(num_samples=16, num_validation_samples=16, num_heldout_samples=16), teacher_factor=10),
    # < 20 minutes on one CPU thread: every objective at NFE 5 and 10, the cheap ones at every NFE; the endpoint
    # objective (cost ~ NFE^2) up to NFE 10.
    "medium": dict(n=2000, ref=10000, nfes=ALL_NFES,
                   objectives={"teacher_local": ALL_NFES, "paper": ALL_NFES, "endpoint": [4, 5, 6, 8, 10],
                               "paper_x0": [5, 10]},
                   unipc_nfes=[5, 10], floor_steps=500,
                   calib=dict(num_samples=256, num_validation_samples=256, num_heldout_samples=256),
                   teacher_factor=20),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def main(args) -> dict:
    from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler, TimeTunerUniPCMultistepScheduler
    from diffusers_timetuner.calibration import calibrate
    from diffusers_timetuner.sampling import sample
    from diffusers_timetuner.testbeds import load_flow_gmm_model

    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    size = SIZES[args.size]
    model = load_flow_gmm_model().to(device)
    shape = (1, 8, 8)

    def velocity(x, t, cond):
        return model(x, t).sample

    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((size["n"], *shape), generator=g)
    exact = model.sample_data(size["ref"], torch.Generator().manual_seed(args.seed + 1))
    exact2 = model.sample_data(size["ref"], torch.Generator().manual_seed(args.seed + 2))
    data = model.sample_data(4096, torch.Generator().manual_seed(args.seed + 3))  # paper_x0's x_0 (Alg. 1)
    fd = lambda x: evaluation.fd_pixels(x, exact)  # noqa: E731
    families = {
        "flow_euler": lambda: TimeTunerFlowMatchEulerDiscreteScheduler(),
        "unipc_flow": lambda: TimeTunerUniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                               flow_shift=1.0, solver_order=2),
    }

    cli_args.log(f"{NAME}: floor = Euler at {size['floor_steps']} steps on {size['n']} samples")
    floor = sample(velocity, families["flow_euler"](), noise, size["floor_steps"])
    results = {
        "settings": {k: v for k, v in size.items()},
        "fd_exact_vs_exact": fd(exact2[: size["n"]]),
        "floor": {"steps": size["floor_steps"], "fd": fd(floor)},
        "cells": [],
    }

    def score(x):
        return {"fd": fd(x), "l2_to_floor": evaluation.endpoint_l2(x, floor)}

    plan = [("flow_euler", nfe) for nfe in size["nfes"]] + [("unipc_flow", nfe) for nfe in size["unipc_nfes"]]
    for family, nfe in plan:
        if run.out_of_time(f"{family}@{nfe}"):
            continue
        untuned = families[family]()
        cell = {"family": family, "nfe": nfe, "untuned": score(sample(velocity, untuned, noise, nfe)), "tuned": {}}
        objectives = [o for o, nfes in size["objectives"].items() if nfe in nfes]
        if family != "flow_euler":
            objectives = ["teacher_local"]
        for obj in objectives:
            if run.out_of_time(f"{family}@{nfe} {obj}"):
                continue
            tick = time.perf_counter()
            kwargs = dict(objective=obj, teacher_steps=size["teacher_factor"] * nfe, seed=args.seed, progress=False,
                          **size["calib"])
            if obj == "paper_x0":
                kwargs.update(strategy="sequential")
            result = calibrate(model, families[family](), nfe, data=data if obj == "paper_x0" else None, **kwargs)
            rep = result.reports[nfe]
            out = writer.calibrated_entry(result, nfe, score(sample(velocity, result.scheduler, noise, nfe)), tick)
            out["identity"] = all(abs(a - b) < 1e-6 for a, b in zip(rep.taus, rep.grid))
            cell["tuned"][obj] = out
            cli_args.log(f"{family}@{nfe} {obj}: FD {cell['untuned']['fd']:.4g} -> {out['fd']:.4g}, "
                       f"L2 {cell['untuned']['l2_to_floor']:.4g} -> {out['l2_to_floor']:.4g} "
                       f"({out['calibration_s']:.0f} s)")
        writer.mark_best(cell)
        results["cells"].append(cell)

    target = next((c for c in results["cells"] if c["family"] == "flow_euler" and c["nfe"] == 10), None)
    results["target"] = {
        "claim": "FlowMatchEuler at 10 steps: FD at least 30% lower than untuned with the best objective",
        "measured_change": None if target is None else target.get("best_fd_change"),
        "best_objective": None if target is None else target.get("best_objective"),
    }
    change = results["target"]["measured_change"]
    results["target"]["met"] = None if change is None else bool(change <= -0.30)
    return run.write(results, markdown(results), plot(results))


def markdown(results) -> str:
    objectives = sorted({o for c in results["cells"] for o in c["tuned"]})
    header = ["sampler", "NFE", "untuned FD", *[f"{o} FD" for o in objectives], "best change",
              "untuned L2", *[f"{o} L2" for o in objectives]]
    rows = []
    for c in results["cells"]:
        t = c["tuned"]
        rows.append([c["family"], c["nfe"], c["untuned"]["fd"], *[t[o]["fd"] if o in t else None for o in objectives],
                     None if c.get("best_fd_change") is None
                     else f"{100 * c['best_fd_change']:+.1f}% ({c['best_objective']})",
                     c["untuned"]["l2_to_floor"], *[t[o]["l2_to_floor"] if o in t else None for o in objectives]])
    tgt = results["target"]
    verdict = ("not measured" if tgt["measured_change"] is None else
               f"{100 * tgt['measured_change']:+.1f}% with {tgt['best_objective']}: "
               + ("MET" if tgt["met"] else "NOT MET"))
    return (f"# Flow matching on the exact-velocity GMM\n\nFD: pixel Frechet distance to exact mixture samples "
            f"(two exact sample sets: {results['fd_exact_vs_exact']:.4g}; Euler at {results['floor']['steps']} steps: "
            f"{results['floor']['fd']:.4g}). L2: mean endpoint L2 distance to that many-step sample from the "
            f"same x_T.\n\n" + writer.markdown_table(header, rows)
            + f"\n**Target** ({tgt['claim']}): {verdict}\n")


def plot(results):
    fig, axes = writer.figure(2, 1)
    for family in sorted({c["family"] for c in results["cells"]}):
        cells = [c for c in results["cells"] if c["family"] == family]
        for k, key in enumerate(("fd", "l2_to_floor")):
            ax = axes[0][k]
            ax.plot([c["nfe"] for c in cells], [c["untuned"][key] for c in cells], "o--", label=f"{family} untuned")
            objectives = sorted({o for c in cells for o in c["tuned"]})
            for o in objectives:
                pts = [(c["nfe"], c["tuned"][o][key]) for c in cells if o in c["tuned"]]
                ax.plot(*zip(*pts), "o-", label=f"{family} {o}")
    for k, (key, title) in enumerate((("fd", "FD to exact samples"), ("l2_to_floor", "L2 to many-step sample"))):
        ax = axes[0][k]
        ax.set_xlabel("NFE")
        ax.set_yscale("log")
        ax.set_title(title)
        if key == "fd":
            ax.axhline(results["fd_exact_vs_exact"], color="gray", lw=0.8, label="exact vs exact")
    axes[0][0].legend(fontsize=6)
    return fig


if __name__ == "__main__":
    main(parse_args())
