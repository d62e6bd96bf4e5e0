"""Reproduce the figures in PROVENANCE.md: pixel FD of DDIM vs exact samples (2000 each) and trajectory error.

    PYTHONPATH=src python -m diffusers_timetuner.testbeds.gmm_digits.figures   (about 3 minutes on one CPU thread)
"""
import torch
from diffusers import DDIMScheduler

from diffusers_timetuner import metrics
from diffusers_timetuner.denoiser import Denoiser
from diffusers_timetuner.sampling import sample_trajectory
from diffusers_timetuner.testbeds import load_gmm_pipeline


def main():
    torch.set_num_threads(1)
    pipe = load_gmm_pipeline()
    exact = pipe.unet.sample_data(2000, torch.Generator().manual_seed(1))
    floor = metrics.pixel_frechet_distance(pipe.unet.sample_data(2000, torch.Generator().manual_seed(2)), exact)
    print(f"exact(seed 2) vs exact(seed 1): {floor:.4f}")
    noise = torch.randn(2000, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for n in (10, 20, 100, 1000):
        final = sample_trajectory(Denoiser(pipe.unet), pipe.scheduler, noise, n)[-1]
        print(f"DDIM {n} steps: pixel FD vs exact = {metrics.pixel_frechet_distance(final, exact):.4f}", flush=True)
    # Trajectory error needs the same x_T at the same t_K: "trailing" spacing starts every grid at t = 999.
    trailing = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    trajs = {}
    for n in (10, 20, 100, 1000):
        states = sample_trajectory(Denoiser(pipe.unet), trailing, noise[:500], n)
        trajs[n] = (states, [float(t) for t in trailing.timesteps] + [-1.0])
    ref_states, ref_times = trajs[1000]
    for n in (10, 20, 100):
        states, times = trajs[n]
        err = metrics.trajectory_error(states, ref_states, times=times, reference_times=ref_times)
        print(f"trajectory error DDIM {n} vs 1000 steps (per state):", [round(float(e), 4) for e in err], flush=True)


if __name__ == "__main__":
    main()
