"""Worker of calibration_cost.py's 1 vs 2 processes measurement (started by torchrun, one process per rank).

Runs one `calibrate` call (parallel strategy, paper objective, DDIM) with an ``accelerate.Accelerator(cpu=True)``
(gloo): the calibration samples are split across the processes and losses reduced, so every rank returns the same
table. Rank 0 writes wall time, samples through the network (all processes) and samples per second to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from diffusers_timetuner import calibrate

from . import families, testbeds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--testbed", default="gmm")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    testbed = testbeds.load_testbed(args.testbed, torch.device("cpu"))
    sched = families.make_scheduler("ddim", testbed.noise_config)
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    data = (testbed.data, testbed.labels) if testbed.labels is not None else testbed.data
    result = calibrate(testbed.model, sched, args.nfe, objective="paper", strategy="parallel", data=data,
                       num_samples=args.samples, batch_size=args.samples, num_validation_samples=8,
                       num_heldout_samples=8, seed=args.seed, accelerator=acc, progress=False)
    acc.wait_for_everyone()
    wall = time.perf_counter() - t0
    rep = result.reports[args.nfe]
    if acc.is_main_process:
        Path(args.out).write_text(json.dumps({
            "world_size": acc.num_processes, "wall_time_s": wall, "forward_samples": int(rep.forward_samples),
            "samples_per_s": rep.forward_samples / wall, "taus": [float(t) for t in rep.taus],
            "testbed": args.testbed, "nfe": args.nfe, "calibration_samples": args.samples}))


if __name__ == "__main__":
    main()
