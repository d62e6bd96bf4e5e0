"""Truncation error along the trajectory (the paper's Fig. 2), untuned vs tuned.

For each testbed, sampler (DDIM, DPM-Solver-2), grid (uniform / quadratic / log-SNR) and NFE, every state x~_{t_i} of
the few-step sampler is compared with the state x_{t_i} of a 1000-step DDIM reference started from the same x_T
(batch mean of the per-sample L2 norm, `diffusers_timetuner.metrics.trajectory_error`). The reference contains every
integer time, so every grid time of every sampler is matched exactly; the last point (t = -1) is the final sample.

Usage: python -m benchmarks.trajectory_error --quick|--medium|--full [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse

from diffusers_timetuner.metrics import trajectory_error

from . import cli_args, evaluation, families, table_cache, testbeds, writer
from .grids import grid_spec

NAME = "trajectory_error"
# (family, grid kind, NFE): the paper's panels (a) quadratic 10, (b) quadratic 20, (c) uniform 10, (d) log-SNR 10.
PANELS = [("quadratic", 10), ("quadratic", 20), ("uniform", 10), ("logsnr", 10)]
SIZES = {
    "quick": dict(testbeds=["gmm"], panels=[("uniform", 5)], families=["ddim"], n=16, ref_steps=100,
                  objectives=["paper"]),
    "medium": dict(testbeds=["gmm"], panels=PANELS, families=["ddim", "dpm2", "dpmpp"], n=256, ref_steps=1000,
                   objectives=["endpoint", "paper"]),
    "full": dict(testbeds=["gmm", "mnist"], panels=PANELS, families=["ddim", "dpm2", "dpmpp"], n=512, ref_steps=1000,
                 objectives=["endpoint", "paper"]),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def reference(testbed, noise, steps, device):
    """Many-step DDIM states and their times (every integer time when steps == num_train_timesteps)."""
    sched = families.make_scheduler("ddim", testbed.noise_config, timestep_spacing="trailing")
    return evaluation.trajectory(testbed, sched, steps, noise, device, family="ddim")


def errors(states, times, ref_states, ref_times):
    err = trajectory_error(states, ref_states, times=times, reference_times=ref_times)
    return [float(e) for e in err]


def run_panel(testbed, family, kind, nfe, noise, ref, cfg, args, device, run):
    overrides, custom = grid_spec(family, kind, testbed.noise_config, nfe)
    sched = families.make_scheduler(family, testbed.noise_config, **overrides)
    states, times = evaluation.trajectory(testbed, sched, nfe, noise, device, timesteps=custom, family=family)
    entry = {"family": family, "grid": kind, "nfe": nfe, "times": times,
             "untuned": errors(states, times, *ref), "tuned": {}, "taus": {}, "unavailable": {}}
    for obj in cfg["objectives"]:
        if run.out_of_time(f"{testbed.name} {family}/{kind}/{nfe} {obj}"):
            continue
        cal, err = table_cache.try_calibration(
            testbed, family, nfe, device, tables_dir=run.tables_dir, use_cache=not args.no_cache, objective=obj,
            calib=table_cache.calib_for(args.size, testbed.name), seed=args.seed, overrides=overrides,
            timesteps=custom)
        if cal is None:  # e.g. calibrate cannot take a custom grid
            entry["unavailable"][obj] = err
            continue
        tuned = cal.scheduler(testbed, family)
        t_states, t_times = evaluation.trajectory(testbed, tuned, nfe, noise, device, timesteps=cal.timesteps,
                                                  family=family)
        entry["tuned"][obj] = errors(t_states, t_times, *ref)
        entry["taus"][obj] = cal.taus
    return entry


def main(args) -> dict:
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    cfg = SIZES[args.size]
    results = {"settings": {k: v for k, v in cfg.items()}, "testbeds": {}}
    for tb_name in cfg["testbeds"]:
        testbed = testbeds.load_testbed(tb_name, device)
        noise = evaluation.seeded_noise(cfg["n"], testbed.sample_shape, args.seed + 1000)
        cli_args.log(f"{NAME}: {tb_name} reference ({cfg['ref_steps']} DDIM steps, {cfg['n']} samples)")
        ref = reference(testbed, noise, cfg["ref_steps"], device)
        panels = {}
        for kind, nfe in cfg["panels"]:
            for family in cfg["families"]:
                if run.out_of_time(f"{tb_name} {family}/{kind}/{nfe}"):
                    continue
                cli_args.log(f"{NAME}: {tb_name} {family} {kind} NFE={nfe}")
                panels[f"{family}_{kind}_{nfe}"] = run_panel(testbed, family, kind, nfe, noise, ref, cfg, args,
                                                             device, run)
        results["testbeds"][tb_name] = panels
    return run.write(results, markdown(results), plot(results, cfg))


def markdown(results) -> str:
    out = ["# Truncation error along the trajectory (paper Fig. 2)\n",
           "L2 distance to a many-step DDIM reference from the same x_T: at the final sample (t = -1) and summed "
           "over the grid. Lower is better.\n"]
    for tb, panels in results["testbeds"].items():
        objs = sorted({o for p in panels.values() for o in p["tuned"]})
        header = ["sampler", "grid", "NFE", "final untuned"] + [f"final {o}" for o in objs] + \
                 ["sum untuned"] + [f"sum {o}" for o in objs]
        rows = []
        for p in panels.values():
            finals = [p["tuned"][o][-1] if o in p["tuned"] else None for o in objs]
            sums = [sum(p["tuned"][o]) if o in p["tuned"] else None for o in objs]
            rows.append([families.FAMILIES[p["family"]].label, p["grid"], p["nfe"], p["untuned"][-1], *finals,
                         sum(p["untuned"]), *sums])
        out.append(f"\n## {tb}\n\n" + writer.markdown_table(header, rows))
        notes = [f"- {key} {o}: not calibrated ({why[:200]})\n" for key, p in panels.items()
                 for o, why in p["unavailable"].items()]
        if notes:
            out.append("\n" + "".join(notes))
    return "".join(out)


def plot(results, cfg):
    tbs = list(results["testbeds"])
    fig, axes = writer.figure(ncols=len(cfg["panels"]), nrows=len(tbs), size=(4.2, 3.2))
    colors = {"untuned": "tab:red", "paper": "tab:blue", "paper_x0": "tab:orange", "teacher_local": "tab:green",
              "endpoint": "tab:purple"}
    styles = {"ddim": "-", "dpm2": "--", "dpmpp": ":"}
    for r, tb in enumerate(tbs):
        for c, (kind, nfe) in enumerate(cfg["panels"]):
            ax = axes[r][c]
            for family in cfg["families"]:
                p = results["testbeds"][tb].get(f"{family}_{kind}_{nfe}")
                if p is None:
                    continue
                x = list(range(len(p["times"])))
                lab = families.FAMILIES[family].label
                ax.plot(x, p["untuned"], styles[family], color=colors["untuned"], marker=".", label=f"{lab}")
                for o, e in p["tuned"].items():
                    ax.plot(x, e, styles[family], color=colors.get(o, "k"), marker=".", label=f"{lab} + {o}")
            ax.set_title(f"{tb}: {kind}, NFE={nfe}", fontsize=9)
            ax.set_xlabel("step (t_K -> final)")
            ax.set_ylabel("L2 to reference")
            ax.set_yscale("log")
            if r == 0 and c == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
