"""Calibration cost and the sequential vs parallel strategy (the paper's Tab. 5).

For DDIM on each testbed: model evaluations (forward and backward counted separately, as reported by `calibrate`)
and wall time per objective x optimiser x strategy, with the quality (FD) of each resulting table on the same
samples. Combinations that `calibrate` rejects are listed with its error message. Then the throughput of the
parallel strategy's unit of work with 1 vs 2 processes (``torchrun --standalone --nproc_per_node N``, CPU, gloo;
docs/facts.md, 3), measured by `benchmarks/_dist_worker.py`.

Usage: python -m benchmarks.calibration_cost --quick|--medium|--full [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import diffusers_timetuner

from . import cli_args, evaluation, families, table_cache, testbeds, writer
from .peers import counts
from .quality_vs_nfe import Evaluator

NAME = "calibration_cost"
SIZES = {
    "quick": dict(testbeds={"gmm": 32}, nfe=5, objectives=["paper"], optimizers=["default"],
                  strategies=["sequential", "parallel"], batch=256,
                  procs=[], worker=None),
    # Adam only with the local objectives: back-propagating through a roll-out objective 500 times per step costs
    # minutes per table (CPU: ~110 s for the exact model at NFE 10).
    "medium": dict(testbeds={"gmm": 2000}, nfe=10, objectives=list(table_cache.OBJECTIVES),
                   adam_objectives=["paper", "paper_x0"],
                   optimizers=["default", "adam"], strategies=["sequential", "parallel"], batch=500, procs=[1, 2],
                   worker=dict(testbed="mnist", samples=16, nfe=4)),
    "full": dict(testbeds={"gmm": 10000, "mnist": 5000}, nfe=10, objectives=list(table_cache.OBJECTIVES),
                 adam_objectives=["paper", "paper_x0"],
                 optimizers=["default", "adam"], strategies=["sequential", "parallel"], batch=5000, procs=[1, 2],
                 worker=dict(testbed="mnist", samples=32, nfe=4)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return cli_args.add_common_args(parser).parse_args(argv)


def cost_table(testbed, n, cfg, evaluator, args, device, run):
    rows = {}
    for obj in cfg["objectives"]:
        for opt in cfg["optimizers"]:
            if opt == table_cache.REFERENCE_OPTIMIZER and obj not in cfg.get("adam_objectives", [obj]):
                continue  # medium: Adam through a roll-out objective costs minutes per table on CPU
            for strategy in cfg["strategies"]:
                key = f"{obj}/{opt}/{strategy}"
                if run.out_of_time(f"{testbed.name} {key}"):
                    continue
                cli_args.log(f"{NAME}: {testbed.name} {key}")
                cal, err = table_cache.try_calibration(
                    testbed, "ddim", cfg["nfe"], device, tables_dir=run.tables_dir, use_cache=not args.no_cache,
                    objective=obj, optimizer=opt, strategy=strategy,
                    calib=table_cache.calib_for(args.size, testbed.name), seed=args.seed)
                if cal is None:  # a combination the package does not offer (ValueError), or a failure
                    rows[key] = {"unavailable": err}
                    continue
                x = evaluation.generate(testbed, cal.scheduler(testbed, "ddim"), cfg["nfe"], n, args.seed, device,
                                        batch_size=cfg["batch"], family="ddim")
                rows[key] = {**counts(cal.report), "quality": evaluator(x), "taus": cal.taus,
                             "measured_on": cal.device, "cached": cal.cached}
    return rows


def throughput(cfg, args):
    """Samples per second of one `calibrate` call (parallel strategy, paper objective, DDIM), 1 vs 2 CPU processes
    (one thread each), on the MNIST UNet (compute-bound; on the cheap exact model the gloo reductions dominate)."""
    out = {}
    # the workers import the same package copy as this process, and `benchmarks` from the repository root
    pkg_root = str(Path(diffusers_timetuner.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [pkg_root, str(cli_args.REPO), os.environ.get("PYTHONPATH", "")]))
    for procs in cfg["procs"]:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "out.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "--module", "benchmarks._dist_worker", "--out", str(result),
                   "--samples", str(cfg["worker"]["samples"]), "--nfe", str(cfg["worker"]["nfe"]),
                   "--testbed", cfg["worker"]["testbed"], "--seed", str(args.seed)]
            cli_args.log(f"{NAME}: throughput with {procs} process(es)")
            proc = subprocess.run(cmd, cwd=cli_args.REPO, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            out[str(procs)] = json.loads(result.read_text())
    if "1" in out and "2" in out:
        out["speedup_2_over_1"] = out["2"]["samples_per_s"] / out["1"]["samples_per_s"]
        out["max_abs_tau_difference_2_vs_1"] = max(abs(a - b) for a, b in zip(out["1"]["taus"], out["2"]["taus"]))
    return out


def main(args) -> dict:
    device = cli_args.setup(args)
    run = writer.Run(NAME, args, device)
    cfg = SIZES[args.size]
    results = {"settings": cfg, "testbeds": {}}
    for tb_name, n in cfg["testbeds"].items():
        testbed = testbeds.load_testbed(tb_name, device)
        evaluator = Evaluator(testbed, n, args.seed, None)
        untuned = evaluation.generate(testbed, families.make_scheduler("ddim", testbed.noise_config), cfg["nfe"], n,
                                      args.seed, device, batch_size=cfg["batch"], family="ddim")
        results["testbeds"][tb_name] = {"n_samples": n, "untuned": evaluator(untuned),
                                        "runs": cost_table(testbed, n, cfg, evaluator, args, device, run)}
    results["throughput"] = {} if run.out_of_time("throughput 1 vs 2 processes") else throughput(cfg, args)
    return run.write(results, markdown(results, cfg), plot(results))


def markdown(results, cfg) -> str:
    out = [f"# Calibration cost (DDIM, NFE={cfg['nfe']}) and sequential vs parallel (paper Tab. 5)\n"]
    for tb, r in results["testbeds"].items():
        out.append(f"\n## {tb} ({r['n_samples']} samples; untuned FD {r['untuned']['fd']:.4g})\n\n")
        rows = []
        for key, e in r["runs"].items():
            if "unavailable" in e:
                rows.append([key, None, None, None, None, f"no table: {e['unavailable']}"])
                continue
            rows.append([key, e["forward"], e["backward"], e["wall_time_s"], e["quality"]["fd"], e["measured_on"]])
        out.append(writer.markdown_table(["objective/optimiser/strategy", "forward evals", "backward evals",
                                          "wall s", "FD", "measured on"], rows))
    tp = results["throughput"]
    if tp:
        rows = [[k, v["samples_per_s"], v["wall_time_s"], v["world_size"]] for k, v in tp.items()
                if isinstance(v, dict)]
        w = next(v for v in tp.values() if isinstance(v, dict))
        out.append(f"\n## Throughput, 1 vs 2 processes (CPU, torchrun, 1 thread each; calibrate, parallel strategy, "
                   f"{w['testbed']}, DDIM NFE={w['nfe']}, {w['calibration_samples']} calibration samples)\n\n")
        out.append(writer.markdown_table(["processes", "samples/s", "wall s", "world size"], rows))
        if "speedup_2_over_1" in tp:
            out.append(f"\nSpeed-up 2 over 1 process: {tp['speedup_2_over_1']:.2f}x; max |tau(2) - tau(1)| = "
                       f"{tp['max_abs_tau_difference_2_vs_1']:.3g}\n")
    return "".join(out)


def plot(results):
    tbs = list(results["testbeds"])
    fig, axes = writer.figure(ncols=len(tbs), nrows=1, size=(5.5, 3.6))
    for c, tb in enumerate(tbs):
        ax = axes[0][c]
        runs = {k: e for k, e in results["testbeds"][tb]["runs"].items() if "unavailable" not in e}
        for k, e in runs.items():
            evals = (e["forward"] or 0) + (e["backward"] or 0)
            ax.scatter(max(evals, 1), e["quality"]["fd"], label=k)
        ax.axhline(results["testbeds"][tb]["untuned"]["fd"], color="tab:red", ls="--", label="untuned")
        ax.set_xscale("log")
        ax.set_xlabel("model evaluations (forward + backward, samples)")
        ax.set_ylabel("FD")
        ax.set_title(f"{tb}: cost vs quality", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(parse_args())
