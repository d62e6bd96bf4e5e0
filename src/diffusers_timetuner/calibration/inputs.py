"""What :func:`~diffusers_timetuner.calibration.api.calibrate` is given, made usable before any calibration: the
network's device, data (and its labels), the sample shape, the seeded disjoint sample sets, the check that the
network takes fractional timesteps (and a probe of it for checkpoint fingerprints) and the custom-grid check."""

from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch

from .calibrator import CalibrationSet


def check_custom_grid(scheduler, timesteps: Sequence[int]) -> None:
    """Refuse a custom grid that is not descending integers in range, or a scheduler without custom grids."""
    from ..schedulers.mixin import validate_custom_timesteps

    validate_custom_timesteps(timesteps, int(scheduler.config.num_train_timesteps))
    probe = copy.deepcopy(scheduler)
    try:
        probe.set_timesteps(timesteps=list(timesteps))
    except TypeError as err:  # the parent's set_timesteps has no `timesteps` argument
        raise ValueError(f"{type(scheduler).__name__} cannot run a custom grid (`set_timesteps(timesteps=...)`): "
                         "calibrate it with num_inference_steps, or use DDIM, DDPM, DPM-Solver multistep or "
                         "Euler.") from err
    if len(probe.timesteps) != len(timesteps):
        raise ValueError(f"{type(scheduler).__name__} makes {len(probe.timesteps)} model evaluations on the custom "
                         f"grid of {len(timesteps)} timesteps; calibration needs one per grid time.")


def model_device(model) -> torch.device:
    """The device of the network's first parameter (or buffer); CPU for a parameter-free model."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(model, torch.nn.Module):
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            return tensor.device
    return torch.device("cpu")


def check_float_timesteps(denoiser, shape, cond, device, train_steps: int) -> float:
    """Refuse a network whose timestep input ignores fractions (outputs at t and t + 0.5 identical).

    Returns a probe of the model (mean |output| on a fixed input, 6 significant digits) for checkpoint fingerprints.
    """
    g = torch.Generator().manual_seed(12345)
    x = torch.randn((1, *shape), generator=g).to(device)
    t = float(train_steps // 2)
    with torch.no_grad():
        a = denoiser(x, torch.tensor(t), cond)
        b = denoiser(x, torch.tensor(t + 0.5), cond)
    denoiser.num_forward_samples = 0
    if torch.equal(a, b):
        raise ValueError(
            f"{type(denoiser.model).__name__} gives identical outputs at timesteps {t} and {t + 0.5}: its timestep "
            "input does not take fractional values (e.g. it casts to an integer or looks up an embedding table), so "
            "TimeTuner cannot tune it. Use a model with a continuous (e.g. sinusoidal) timestep embedding."
        )
    return float(f"{float(a.double().abs().mean()):.6g}")


def sample_shape_of(model, data, sample_shape):
    """What the network takes: ``sample_shape``, else its config's, else the data's (checked against it by the
    caller, so data of another shape is refused rather than taken as the model's shape)."""
    if sample_shape is not None:
        return tuple(int(s) for s in sample_shape)
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "sample_size", None)
    channels = getattr(cfg, "in_channels", None)
    if (size is None or channels is None) and data is not None:
        return tuple(data.shape[1:])
    if size is None or channels is None:
        raise ValueError("Cannot infer the sample shape from the model's config: pass sample_shape=(C, H, W).")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(channels), *size)


def split_data(data):
    """``data`` may be images or (images, class labels); labels then condition the data-based trajectories."""
    if data is None:
        return None, None
    labels = None
    if isinstance(data, (tuple, list)) and len(data) == 2:
        data, labels = data
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    data = torch.as_tensor(data, dtype=torch.float32)
    if labels is not None and labels.shape[0] != data.shape[0]:
        raise ValueError(f"data has {data.shape[0]} images but {labels.shape[0]} labels.")
    return data, labels


def draw_set(num, shape, cond_set, data, seed, data_labels=None) -> CalibrationSet:
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((int(num), *shape), generator=g)
    cond, x0 = cond_set.take(range(int(num))), None
    if data is not None:
        if data.shape[0] < num:
            idx = torch.randint(0, data.shape[0], (int(num),), generator=g)
        else:
            idx = torch.randperm(data.shape[0], generator=g)[: int(num)]
        x0 = data[idx]
        if data_labels is not None:  # the data's own labels condition its trajectories
            cond = {"class_labels": data_labels[idx]}
    return CalibrationSet(noise, cond, x0)
