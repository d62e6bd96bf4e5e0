"""Sampling and scoring for the benchmarks: seeded x_T, batched sampling and trajectories through the package's
sampling loop, and the figures computed from samples (pixel FD, FD-MNIST + accuracy, endpoint L2)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from diffusers_timetuner import sample, sample_trajectory
from diffusers_timetuner.metrics import pixel_frechet_distance
from diffusers_timetuner.sampling import grid_timesteps
from diffusers_timetuner.testbeds.mnist import classifier

from .families import FAMILIES
from .testbeds import Testbed


def seeded_noise(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """x_T for samples 0..n-1 from one CPU generator: identical on every device and for every sampler."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _set_custom_grid(scheduler, timesteps: Optional[Sequence[int]], nfe: Optional[int], device) -> Optional[int]:
    """Put a custom grid on the scheduler (the step count argument is then None); else pass `nfe` through."""
    if timesteps is None:
        return nfe
    scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
    return None


@torch.no_grad()
def generate(
    testbed: Testbed,
    scheduler,
    nfe: Optional[int],
    n: int,
    seed: int,
    device,
    *,
    guidance_scale: float = 1.0,
    batch_size: int = 1000,
    family: Optional[str] = None,
    timesteps: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """n samples (on CPU, float32) with the shared sampling loop; batch b uses noise rows [b*B, (b+1)*B).

    `timesteps` sets a custom grid instead of `nfe`. Stochastic samplers (DDPM) draw their step noise from a CPU
    generator seeded with seed + 1 + batch index, so results do not depend on the device.
    """
    fam = FAMILIES.get(family) if family else None
    noise = seeded_noise(n, testbed.sample_shape, seed)
    cond_all = testbed.labels_for(n, "cpu")
    den = testbed.denoiser(guidance_scale)
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        x_T = noise[start:start + batch_size].to(device)
        cond = None if cond_all is None else {k: v[start:start + batch_size].to(device) for k, v in cond_all.items()}
        gen = torch.Generator().manual_seed(seed + 1 + b) if fam is not None and fam.stochastic else None
        steps = _set_custom_grid(scheduler, timesteps, nfe, device)
        x = sample(den, scheduler, x_T, steps, cond, eta=fam.eta if fam else None, generator=gen)
        out.append(x.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def trajectory(testbed: Testbed, scheduler, nfe: Optional[int], noise: torch.Tensor, device, *,
               timesteps: Optional[Sequence[int]] = None, family: Optional[str] = None,
               guidance_scale: float = 1.0) -> tuple:
    """(states [x_{t_K}, ..., x_0] on CPU, grid times [t_K, ..., t_1, -1]) from the shared loop."""
    fam = FAMILIES.get(family) if family else None
    cond_all = testbed.labels_for(noise.shape[0], device)
    steps = _set_custom_grid(scheduler, timesteps, nfe, device)
    states = sample_trajectory(testbed.denoiser(guidance_scale), scheduler, noise.to(device), steps, cond_all,
                               eta=fam.eta if fam else None)
    grid = [float(t) for t in grid_timesteps(scheduler).cpu()]
    return [s.float().cpu() for s in states], grid + [-1.0]


def fd_pixels(samples: torch.Tensor, reference: torch.Tensor) -> float:
    return float(pixel_frechet_distance(samples, reference))


def mnist_metrics(samples: torch.Tensor, labels: Optional[torch.Tensor], device) -> Dict[str, float]:
    """FD-MNIST (vs the 1000 held-out digits) and class accuracy from one pass of the MNIST classifier on `device`."""
    feats, preds = classifier.classifier_outputs(samples, device=torch.device(device).type)
    # held-out digits at the samples' resolution (16x16 for the flow-matching testbed)
    fd = classifier.frechet_distance(*classifier.feature_statistics(feats),
                                     *classifier.heldout_mnist_statistics(int(samples.shape[-1])))
    out = {"fd": float(fd)}
    if labels is not None:
        out["accuracy"] = float((preds == labels.cpu()).double().mean())
    return out


def endpoint_l2(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Batch mean of the per-sample L2 distance (same x_T, same row order)."""
    return float((samples.double() - reference.double()).flatten(1).norm(dim=1).mean())
