"""Subprocess worker for tests/test_calibration_processes.py (no tests here; pytest collects nothing).

    python tests/test_calibration_worker.py resume <checkpoint_dir> <out.json> <delay>
        calibrate the exact Gaussian model (DDIM, 12 steps, default objective / optimiser) with checkpoints;
        writes the table to out.json at the end.
    python tests/test_calibration_worker.py dist <out_dir>
        calibrate the exact Gaussian model under Accelerate (samples split across the launched processes), write
        this process's tables to <out_dir>/tables.<rank>.json and, on the main process only, the run's outputs
        (scheduler_config.json, report.json, calibration.png) to <out_dir>/run, as the CLI does.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)

RESUME_STEPS = 12


def resume_job(checkpoint_dir: str, out: str, delay: float):
    from diffusers_timetuner.calibration import calibrate
    from test_calibration_helpers import GaussianEps, ddim

    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod, delay=delay)
    res = calibrate(model, sched, RESUME_STEPS, num_samples=8, batch_size=8, num_validation_samples=4,
                    num_heldout_samples=4, sample_shape=(1, 4, 4), checkpoint_dir=checkpoint_dir, progress=False)
    with open(out, "w") as f:
        json.dump(res.tables[RESUME_STEPS], f)


DIST_STEPS = (3, 4)


def dist_job(out_dir: str, accelerator=None):
    from diffusers_timetuner.calibration import calibrate
    from test_calibration_helpers import GaussianEps, ddim

    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    res = calibrate(model, sched, list(DIST_STEPS), num_samples=12, batch_size=6, num_validation_samples=6,
                    num_heldout_samples=6, sample_shape=(1, 4, 4), accelerator=accelerator, progress=False)
    rank = accelerator.process_index if accelerator is not None else 0
    with open(os.path.join(out_dir, f"tables.{rank}.json"), "w") as f:
        json.dump({str(n): t for n, t in res.tables.items()}, f)
    if accelerator is None or accelerator.is_main_process:
        res.save(os.path.join(out_dir, "run"), extra={"num_processes": res.settings["num_processes"]})
    return res


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        resume_job(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    elif sys.argv[1] == "dist":
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        dist_job(sys.argv[2], acc)
        acc.wait_for_everyone()
    else:
        raise SystemExit(f"unknown job {sys.argv[1]!r}")
