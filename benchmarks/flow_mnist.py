"""Trained flow-matching MNIST testbed: untuned vs tuned FlowMatchEuler (shift 1.0) or UniPC vs NFE, FD-MNIST.

The model is the bundled 16x16 rectified-flow UNet (`testbeds.load_mnist_flow_pipeline`). For each NFE a table is
calibrated (data-free, endpoint objective, seeded; at NFE 10 the bundled table ``mnist-flow-euler-10-g1`` is used
as it ships), then untuned and tuned Euler draw the same x_T and labels (`testbeds.mnist.evaluate.sample_per_class`,
``n_per_class`` of each digit) and are scored by FD-MNIST against the 1000 held-out digits downsampled to 16x16
(``heldout_mnist_statistics(16)``) and by class accuracy. Many-step Euler from the same x_T is the floor; the 4000
real training digits at 16x16 give the metric's real-data level.

``--family unipc_flow`` runs UniPC instead (bh2, order 2, flow sigmas, shift 1.0: the same ODE, one evaluation per
step; calibrated as Euler is, no bundled table) and writes ``flow_mnist_unipc.*``. UniPC's bh1 variant is left out:
with ``final_sigmas_type="zero"`` its untuned run is already non-finite and calibration refuses it.

Usage: python -m benchmarks.flow_mnist --quick|--medium [--threads 1] [--family unipc_flow]
Cells can run in parallel processes and be merged (same size and seed):
    python -m benchmarks.flow_mnist --medium --nfes 4 6 --out-dir /tmp/a      (one process per NFE subset; one of
    python -m benchmarks.flow_mnist --medium --nfes 20 --skip_floor --out-dir /tmp/b   them measures the floor)
    python -m benchmarks.flow_mnist --medium --merge /tmp/a /tmp/b
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from . import cli_args, writer

NAME = "flow_mnist"
FAMILIES = ("flow_euler", "unipc_flow")
BUNDLED_TABLE = "mnist-flow-euler-10-g1"
SIZES = {
    "quick": dict(n_per_class=2, nfes=[4], floor_steps=20, use_bundled=False,
                  unipc_nfes=[4], calib=dict(objective="endpoint", num_samples=8, batch_size=8,
                                             num_validation_samples=8, num_heldout_samples=8, teacher_steps=20)),
    # The cells of the target: >= 1000 samples, NFE 4-20; the settings of the bundled NFE-10 table (build.py), which
    # comes last so that build.py can run beside the other cells.
    # UniPC: NFE 4, 6, 10 (its floor is the Euler one: the same ODE).
    "medium": dict(n_per_class=100, nfes=[4, 6, 8, 12, 16, 20, 10], floor_steps=100, use_bundled=True,
                   unipc_nfes=[4, 6, 10],
                   calib=dict(objective="endpoint", num_samples=64, batch_size=64, num_validation_samples=64,
                              num_heldout_samples=128, teacher_steps=100)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfes", type=int, nargs="+", default=None, help="override the size's NFE list")
    parser.add_argument("--family", choices=FAMILIES, default="flow_euler",
                        help="the sampler (unipc_flow writes flow_mnist_unipc.*, with no many-step floor of its own)")
    parser.add_argument("--skip_floor", action="store_true", help="do not measure the many-step floor")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="merge the flow_mnist.json of these --out-dir folders into --out-dir (no sampling)")
    return cli_args.add_common_args(parser).parse_args(argv)


def main(args) -> dict:
    from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler, TimeTunerUniPCMultistepScheduler
    from diffusers_timetuner.calibration import calibrate
    from diffusers_timetuner.hub import bundled_schedules_dir as hub_dir, load_tuned_scheduler
    from diffusers_timetuner.testbeds import MNIST_FLOW_MODEL_ID, load_mnist_flow_pipeline
    from diffusers_timetuner.testbeds.mnist.evaluate import evaluate
    from diffusers_timetuner.testbeds.mnist_flow.evaluate import real_16px_floor

    device = cli_args.setup(args)
    unipc = args.family == "unipc_flow"
    run = writer.Run(output_name(args.family), args, device, script=NAME)
    if args.merge:
        return merge(run, args.merge)
    size = SIZES[args.size]
    nfes = args.nfes or size["unipc_nfes" if unipc else "nfes"]
    pipe = load_mnist_flow_pipeline(device)
    base_config = pipe.scheduler.config

    def make_scheduler():
        if unipc:
            return TimeTunerUniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=1.0, solver_order=2, solver_type="bh2",
                                                    num_train_timesteps=base_config.num_train_timesteps)
        return TimeTunerFlowMatchEulerDiscreteScheduler.from_config(base_config)

    def score(scheduler, nfe):
        pipe.scheduler = copy.deepcopy(scheduler)
        row = evaluate(pipe, steps=(nfe,), guidance_scales=(1.0,), n_per_class=size["n_per_class"], seed=args.seed,
                       batch_size=500, reference_size=16)[0]
        return {"fd_mnist": row["fd_mnist"], "accuracy": row["accuracy"], "n_samples": row["n_samples"]}

    untuned = make_scheduler()
    skip_floor = args.skip_floor or unipc
    if not skip_floor:
        cli_args.log(f"{NAME}: floor = Euler at {size['floor_steps']} steps")
    results = {"settings": {**size, "nfes": nfes}, "family": args.family, "real_16px_floor": real_16px_floor(),
               "cells": [], "floor": None if skip_floor else {"steps": size["floor_steps"],
                                                              **score(untuned, size["floor_steps"])}}
    for nfe in nfes:
        if run.out_of_time(f"{args.family}@{nfe}"):
            continue
        tick = time.perf_counter()
        if nfe == 10 and size["use_bundled"] and not unipc:
            deadline = time.time() + 3600
            while not (hub_dir() / BUNDLED_TABLE / "PROVENANCE.md").is_file():  # build.py may still be running
                if time.time() > deadline:
                    raise RuntimeError(f"tuned_schedules/{BUNDLED_TABLE} is missing: run tuned_schedules/build.py "
                                       f"{BUNDLED_TABLE} first")
                time.sleep(10)
            tuned, source = load_tuned_scheduler(BUNDLED_TABLE), f"bundled {BUNDLED_TABLE}"
        else:
            result = calibrate(pipe, make_scheduler(), nfe, seed=args.seed, progress=False,
                               model_id=MNIST_FLOW_MODEL_ID, **size["calib"])
            tuned, source = result.scheduler, "calibrated here"
        calib_s = time.perf_counter() - tick
        cell = {"nfe": nfe, "table": source, "calibration_s": calib_s,
                "taus": [float(t) for t in tuned.config.tuned_timesteps[str(nfe)]]
                if tuned.config.tuned_timesteps and str(nfe) in tuned.config.tuned_timesteps else None,
                "untuned": score(untuned, nfe), "tuned": score(tuned, nfe)}
        cell["fd_change"] = writer.rel_change(cell["tuned"]["fd_mnist"], cell["untuned"]["fd_mnist"])
        results["cells"].append(cell)
        cli_args.log(f"{args.family}@{nfe} ({source}): FD-MNIST {cell['untuned']['fd_mnist']:.3f} -> "
                   f"{cell['tuned']['fd_mnist']:.3f} ({100 * cell['fd_change']:+.1f}%), accuracy "
                   f"{cell['untuned']['accuracy']:.3f} -> {cell['tuned']['accuracy']:.3f} ({calib_s:.0f} s)")
    return run.write(with_target(results), markdown(results))


def output_name(family: str) -> str:
    return NAME if family == "flow_euler" else f"{NAME}_unipc"


def merge(run, folders) -> dict:
    import json

    payloads = [json.loads((Path(f) / f"{run.name}.json").read_text()) for f in folders]
    if len({(p["size"], p["seed"]) for p in payloads}) != 1:
        raise ValueError(f"--merge needs runs of one size and seed, got {[(p['size'], p['seed']) for p in payloads]}")
    parts = [p["results"] for p in payloads]
    floors = [p["floor"] for p in parts if p.get("floor")]
    results = {"settings": {**parts[0]["settings"], "nfes": sorted(c["nfe"] for p in parts for c in p["cells"])},
               "merged_from": [{"command": p["command"], "wall_time_s": p["wall_time_s"]} for p in payloads],
               "family": parts[0].get("family", "flow_euler"),
               "real_16px_floor": parts[0]["real_16px_floor"], "floor": floors[0] if floors else None,
               "cells": sorted((c for p in parts for c in p["cells"]), key=lambda c: c["nfe"])}
    cli_args.log(f"{NAME}: merged {len(parts)} runs")
    return run.write(with_target(results), markdown(results))


def with_target(results) -> dict:
    if results.get("family", "flow_euler") != "flow_euler":  # the target is Euler's
        results["target"] = None
        return results
    target = next((c for c in results["cells"] if c["nfe"] == 10), None)
    results["target"] = {
        "claim": "Euler at 10 steps: FD-MNIST at least 15% lower than untuned, never worse at any NFE",
        "change_at_10": None if target is None else target["fd_change"],
        "worse_at": [c["nfe"] for c in results["cells"] if c["fd_change"] > 0],
    }
    change = results["target"]["change_at_10"]
    results["target"]["met"] = None if change is None else bool(change <= -0.15 and not results["target"]["worse_at"])
    return results


def markdown(results) -> str:
    floor = results["floor"]
    n = results["cells"][0]["untuned"]["n_samples"] if results["cells"] else None
    family = results.get("family", "flow_euler")
    sampler = ("FlowMatchEuler (shift 1.0)" if family == "flow_euler" else
               "UniPC (bh2, order 2, flow sigmas, shift 1.0; endpoint objective, calibrated here)")
    lines = [f"# {output_name(family)}", "", f"{sampler} on the bundled 16x16 flow-matching MNIST UNet; "
             f"{n} samples (same x_T and labels in every cell); FD-MNIST against the held-out digits at 16x16.", "",
             ("- many-step floor: not measured here (the Euler floor of the same ODE is in flow_mnist.md)"
              if family != "flow_euler" else "- many-step floor: not measured") if floor is None else
             f"- many-step floor (Euler {floor['steps']}): FD-MNIST {floor['fd_mnist']:.3f}, "
             f"accuracy {100 * floor['accuracy']:.1f}%",
             f"- real training digits at 16x16: FD-MNIST {results['real_16px_floor']:.3f}", "",
             "| NFE | table | untuned FD-MNIST | tuned FD-MNIST | change | untuned acc. | tuned acc. |",
             "|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        lines.append(f"| {c['nfe']} | {c['table']} | {c['untuned']['fd_mnist']:.3f} | {c['tuned']['fd_mnist']:.3f} | "
                     f"{100 * c['fd_change']:+.1f}% | {100 * c['untuned']['accuracy']:.1f}% | "
                     f"{100 * c['tuned']['accuracy']:.1f}% |")
    for part in results.get("merged_from", []):
        lines.append(f"- merged from `{part['command']}` ({part['wall_time_s']:.0f} s)")
    t = results["target"]
    if t is None:
        return "\n".join(lines + [""])
    change = "not measured" if t["change_at_10"] is None else f"{100 * t['change_at_10']:+.1f}%"
    lines += ["", f"Target ({t['claim']}): change at 10 = {change}; worse at NFE {t['worse_at'] or 'none'}; "
              f"met: {t['met']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main(parse_args())
