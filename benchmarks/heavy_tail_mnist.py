"""Why grid learning overfits on the trained MNIST UNet at CPU sizes: the per-sample endpoint error is heavy-tailed.

Prints, for DPM-Solver++ multistep at 5 steps on the bundled MNIST model and four disjoint seeded sets of 64 x_T
(labels cycling 0-9), the mean and median squared distance of the final sample to a 40-step DPM-Solver++ teacher
from the same x_T, for the scheduler's default grid, the dynamic programme's grid and the grid a 32-sample
``calibrate(tune="grid")`` run learned (docs/facts.md, item 6, quotes one run of this script).

    OMP_NUM_THREADS=2 python -m benchmarks.heavy_tail_mnist
"""
import copy

import torch

from diffusers_timetuner.calibration.families import resolve_scheduler, untuned_copy
from diffusers_timetuner.calibration.teacher import FineTeacher
from diffusers_timetuner.denoiser import Denoiser
from diffusers_timetuner.sampling import sample
from diffusers_timetuner.testbeds import load_mnist_pipeline

GRIDS = {
    "default": [830, 664, 498, 332, 166],
    "dynamic programme": [824, 599, 425, 275, 100],
    "learned on 32 x_T": [956, 620, 425, 293, 125],
}


def main() -> None:
    torch.set_num_threads(2)
    pipe = load_mnist_pipeline()
    base = untuned_copy(resolve_scheduler("dpmsolver", pipe))
    denoiser = Denoiser(pipe.unet)
    teacher = FineTeacher(denoiser, base, 40)
    for seed in (0, 1, 2, 3):
        noise = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        cond = {"class_labels": torch.arange(64) % 10}
        target = teacher.fine_trajectory(noise, cond).states[-1]
        row = []
        for name, grid in GRIDS.items():
            sched = copy.deepcopy(base)
            sched.set_timesteps(timesteps=grid)
            err = (sample(denoiser, sched, noise, None, cond) - target).pow(2).flatten(1).sum(1)
            row.append(f"{name}: mean {float(err.mean()):.2f} median {float(err.median()):.2f}")
        print(f"x_T set {seed}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
