"""Sample quality vs NFE (the paper's Fig. 3 / Tab. 1): untuned vs tuned, every sampler and objective.

- Exact-score model (Gaussian mixture on sklearn digits, 8x8): FD in pixel space against exact samples of the
  mixture, and the endpoint L2 distance to the many-step DDIM sample from the same x_T (deterministic samplers).
- Trained model (class-conditional MNIST UNet): FD-MNIST (Frechet distance in a third-party classifier's features,
  against the 1000 held-out digits) and class accuracy, with and without classifier-free guidance.
Samplers: DDIM, DDPM (eta = 1), DPM-Solver-2 (singlestep), DPM-Solver++ (multistep); the many-step DDIM sampler is
the floor. Every sampler, NFE and objective uses the same x_T (and class labels) for its samples.

Usage: python -m benchmarks.quality_vs_nfe --quick|--medium|--full [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import cli_args, evaluation, families, table_cache, testbeds, writer

NAME = "quality_vs_nfe"
ALL_FAMILIES = ["ddim", "ddpm", "dpm2", "dpmpp"]
ALL_NFES = [4, 5, 6, 8, 10, 15, 20]
GUIDANCE = 2.0
SIZES = {
    "quick": dict(
        gmm=dict(n=32, families=["ddim"], nfes=[5], guidance=[1.0], floor_steps=20, joint_cells=[("ddim", 5)]),
        mnist=dict(n=32, families=["ddim"], nfes=[4], guidance=[1.0], floor_steps=20, objectives=[]),
        objectives=["paper"], batch=256),
    # Medium (CPU): the exact model in full (every objective at NFE 5 and 10, default + paper elsewhere); the trained
    # model only at the three target cells, default and paper objectives, 200 samples (its UNet costs ~20 ms per
    # sample and evaluation on one CPU thread).
    "medium": dict(
        gmm=dict(n=2000, families=ALL_FAMILIES, nfes=ALL_NFES, guidance=[1.0], floor_steps=1000,
                 all_objectives_nfes=[5, 10], few_objectives=["default", "paper"],
                 joint_cells=[("ddim", 5), ("ddim", 10)]),
        mnist=dict(n=200, families=["ddim", "dpm2", "dpmpp"], nfes=[5, 10],
                   cells=[("ddim", 10), ("dpm2", 5), ("dpmpp", 5)], guidance=[1.0], floor_steps=30,
                   objectives=["default", "paper"]),
        objectives=list(table_cache.OBJECTIVES), batch=500),
    # Full: every objective at every cell of the exact model; on the trained model every objective at NFE 5 and 10,
    # the package default and the paper's objective at the other NFEs (the endpoint objective's cost grows as NFE^2).
    "full": dict(
        gmm=dict(n=10000, families=ALL_FAMILIES, nfes=ALL_NFES, guidance=[1.0], floor_steps=1000,
                 joint_cells=[("ddim", 5), ("ddim", 10), ("dpmpp", 5), ("dpmpp", 10)]),
        mnist=dict(n=5000, families=ALL_FAMILIES, nfes=ALL_NFES, guidance=[1.0, GUIDANCE], floor_steps=200,
                   all_objectives_nfes=[5, 10], few_objectives=["default", "paper"]),
        objectives=list(table_cache.OBJECTIVES), batch=5000),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


class Evaluator:
    """Quality figures of one sample set on one testbed (same x_T rows as the floor samples)."""

    def __init__(self, testbed, n, seed, floor_samples):
        self.testbed, self.n, self.floor = testbed, n, floor_samples
        self.exact = testbed.exact_sampler(n, seed + 7) if testbed.exact_sampler is not None else None
        self.labels = None if testbed.num_classes is None else testbed.labels_for(n, "cpu")["class_labels"]

    def __call__(self, samples, deterministic=True):
        if self.exact is not None:
            out = {"fd": evaluation.fd_pixels(samples, self.exact)}
        else:
            out = evaluation.mnist_metrics(samples, self.labels, self.testbed.device)
        if deterministic and self.floor is not None:
            out["endpoint_l2"] = evaluation.endpoint_l2(samples, self.floor)
        return out


JOINT = "endpoint+adam_joint"  # the variant key of the jointly tuned endpoint tables


# Measured first, so that a run that hits its time budget still has the headline targets.
PRIORITY = [("mnist", 1.0, "ddim", 10), ("mnist", 1.0, "dpm2", 5), ("mnist", 1.0, "dpmpp", 5),
            ("gmm", 1.0, "ddim", 10)]


def cells(cfg):
    """Every (testbed, guidance, family, NFE) cell, target cells first, then the cheap testbed, low NFEs first."""
    every = [(tb, g, fam, nfe) for tb in ("gmm", "mnist") for g in cfg[tb]["guidance"]
             for fam in cfg[tb]["families"] for nfe in cfg[tb]["nfes"]
             if "cells" not in cfg[tb] or (fam, nfe) in cfg[tb]["cells"]]
    first = [c for c in PRIORITY if c in every]
    rest = sorted((c for c in every if c not in first), key=lambda c: (c[0] != "gmm", c[1] != 1.0, c[3],
                                                                       ALL_FAMILIES.index(c[2])))
    return first + rest


def objectives_for(cfg, tb, nfe):
    """Objectives of one cell, the package default first."""
    sizes = cfg[tb]
    default = table_cache.package_default_objective()
    objs = [default if o == "default" else o for o in sizes.get("objectives", cfg["objectives"])]
    if nfe not in sizes.get("all_objectives_nfes", sizes["nfes"]):
        few = [default if o == "default" else o for o in sizes.get("few_objectives", objs)]
        objs = [o for o in objs if o in few]
    return sorted(objs, key=lambda o: (o != default, o != "paper", o))


def evaluate_cell(testbed, family, nfe, g, sizes, cfg, evaluator, args, device, run):
    fam = families.FAMILIES[family]
    label = f"{testbed.name} g={g:g} {family} NFE={nfe}"
    cli_args.log(f"{NAME}: {label}")
    x = evaluation.generate(testbed, families.make_scheduler(family, testbed.noise_config), nfe, sizes["n"], args.seed,
                            device, guidance_scale=g, batch_size=cfg["batch"], family=family)
    entry = {"untuned": evaluator(x, not fam.stochastic), "tuned": {}, "taus": {}, "calibration": {}, "failed": {}}
    # Variants: every objective with the default optimiser, plus (joint_cells) the endpoint objective with all taus
    # tuned jointly by Adam through the whole sampler, keyed "endpoint+adam_joint".
    variants = [(obj, obj, table_cache.DEFAULT_OPTIMIZER) for obj in objectives_for(cfg, testbed.name, nfe)]
    if (family, nfe) in sizes.get("joint_cells", []):
        variants.append((JOINT, "endpoint", "adam_joint"))
    for obj, objective, optimizer in variants:
        if run.out_of_time(f"{label} {obj}"):
            continue
        cal, err = table_cache.try_calibration(testbed, family, nfe, device, tables_dir=run.tables_dir,
                                               use_cache=not args.no_cache, objective=objective, optimizer=optimizer,
                                               guidance_scale=g, calib=table_cache.calib_for(args.size, testbed.name),
                                               seed=args.seed)
        if cal is None:
            entry["failed"][obj] = err
            continue
        x = evaluation.generate(testbed, cal.scheduler(testbed, family), nfe, sizes["n"], args.seed, device,
                                guidance_scale=g, batch_size=cfg["batch"], family=family)
        entry["tuned"][obj] = evaluator(x, not fam.stochastic)
        entry["taus"][obj] = cal.taus
        entry["calibration"][obj] = {"table": Path(cal.path).name, "cached": cal.cached, "report": cal.report}
    return entry


def main(args) -> dict:
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    cfg = SIZES[args.size]
    results = {"settings": cfg, "package_default_objective": table_cache.package_default_objective(), "testbeds": {}}
    evaluators = {}
    for tb_name, g, family, nfe in cells(cfg):
        sizes = cfg[tb_name]
        testbed = testbeds.load_testbed(tb_name, device)
        g_out = results["testbeds"].setdefault(tb_name, {}).get(f"g{g:g}")
        if g_out is None:  # the floor of this (testbed, guidance), on first use
            if run.out_of_time(f"{tb_name} g={g:g} (floor and all its cells)"):
                continue
            cli_args.log(f"{NAME}: {tb_name} g={g:g} floor ({sizes['floor_steps']} DDIM steps, {sizes['n']} samples)")
            floor = evaluation.generate(testbed, families.make_scheduler("ddim", testbed.noise_config),
                                        sizes["floor_steps"], sizes["n"], args.seed, device, guidance_scale=g,
                                        batch_size=cfg["batch"], family="ddim")
            evaluators[(tb_name, g)] = Evaluator(testbed, sizes["n"], args.seed, floor)
            g_out = {"floor": {"steps": sizes["floor_steps"], **evaluators[(tb_name, g)](floor, False)},
                     "families": {}}
            results["testbeds"][tb_name][f"g{g:g}"] = g_out
        if run.out_of_time(f"{tb_name} g={g:g} {family} NFE={nfe}"):
            continue
        entry = evaluate_cell(testbed, family, nfe, g, sizes, cfg, evaluators[(tb_name, g)], args, device, run)
        g_out["families"].setdefault(family, {})[str(nfe)] = entry
    for per_g in results["testbeds"].values():  # families and NFEs in their natural order
        for g_out in per_g.values():
            g_out["families"] = {f: dict(sorted(v.items(), key=lambda kv: int(kv[0])))
                                 for f, v in sorted(g_out["families"].items(),
                                                    key=lambda kv: ALL_FAMILIES.index(kv[0]))}
    return run.write(results, markdown(results), plot(results))


def metric_name(tb):
    return "FD (pixels, vs exact samples)" if tb == "gmm" else "FD-MNIST"


def markdown(results) -> str:
    out = ["# Sample quality vs NFE (paper Fig. 3 / Tab. 1)\n\n",
           "FD: lower is better. `x%` = change vs the untuned sampler at the same NFE (negative = better). "
           "Same x_T and labels for every column.\n"]
    for tb, per_g in results["testbeds"].items():
        for gkey, g_out in per_g.items():
            floor = g_out["floor"]
            out.append(f"\n## {tb}, guidance {gkey[1:]}: {metric_name(tb)}\n\n"
                       f"Floor: {floor['steps']}-step DDIM, FD {floor['fd']:.4g}\n\n")
            objs = sorted({o for fam in g_out["families"].values() for e in fam.values() for o in e["tuned"]})
            header = ["sampler", "NFE", "untuned"] + objs
            rows = []
            for family, per_nfe in g_out["families"].items():
                for nfe, e in per_nfe.items():
                    base = e["untuned"]["fd"]
                    cells = []
                    for o in objs:
                        v = e["tuned"].get(o, {}).get("fd")
                        ch = writer.rel_change(v, base)
                        cells.append(None if v is None else f"{v:.4g} ({100 * ch:+.1f}%)")
                    rows.append([families.FAMILIES[family].label, nfe, base, *cells])
            out.append(writer.markdown_table(header, rows))
            fails = [f"{families.FAMILIES[f].label} NFE={n} {o}: {m}" for f, per_nfe in g_out["families"].items()
                     for n, e in per_nfe.items() for o, m in e.get("failed", {}).items()]
            if fails:
                out.append("\nCalibration failed (no table):\n\n" + "".join(f"- {x}\n" for x in fails))
            if tb == "gmm":
                rows = []
                for family, per_nfe in g_out["families"].items():
                    for nfe, e in per_nfe.items():
                        if "endpoint_l2" not in e["untuned"]:
                            continue
                        rows.append([families.FAMILIES[family].label, nfe, e["untuned"]["endpoint_l2"],
                                     *[e["tuned"].get(o, {}).get("endpoint_l2") for o in objs]])
                if rows:
                    out.append(f"\nEndpoint L2 to the {floor['steps']}-step DDIM sample from the same x_T:\n\n")
                    out.append(writer.markdown_table(["sampler", "NFE", "untuned"] + objs, rows))
    return "".join(out)


def plot(results):
    panels = [(tb, gkey) for tb, per_g in results["testbeds"].items() for gkey in per_g]
    shown = sorted({f for tb, g in panels for f in results["testbeds"][tb][g]["families"]},
                   key=ALL_FAMILIES.index)
    fig, axes = writer.figure(ncols=len(shown), nrows=len(panels), size=(3.8, 3.0))
    colors = {"untuned": "tab:red", "paper": "tab:blue", "paper_x0": "tab:orange", "teacher_local": "tab:green",
              "endpoint": "tab:purple"}
    for r, (tb, gkey) in enumerate(panels):
        g_out = results["testbeds"][tb][gkey]
        for c, family in enumerate(shown):
            ax = axes[r][c]
            per_nfe = g_out["families"].get(family)
            if per_nfe is None:
                ax.axis("off")
                continue
            nfes = [int(k) for k in per_nfe]
            ax.plot(nfes, [per_nfe[str(k)]["untuned"]["fd"] for k in nfes], "o--", color=colors["untuned"],
                    label="untuned")
            objs = sorted({o for e in per_nfe.values() for o in e["tuned"]})
            for o in objs:
                ax.plot(nfes, [per_nfe[str(k)]["tuned"].get(o, {}).get("fd", float("nan")) for k in nfes], "o-",
                        color=colors.get(o, "k"), label=f"tuned: {o}")
            ax.axhline(g_out["floor"]["fd"], color="gray", ls=":", label=f"{g_out['floor']['steps']}-step floor")
            ax.set_yscale("log")
            ax.set_title(f"{tb} {gkey}: {families.FAMILIES[family].label}", fontsize=9)
            ax.set_xlabel("NFE")
            ax.set_ylabel(metric_name(tb), fontsize=8)
            ax.legend(fontsize=5)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
