"""The testbeds the benchmarks run on, loaded once per device: the exact-score GMM and the same mixture as an
exact-velocity flow-matching model (each with an exact sampler of its data distribution), the bundled
class-conditional MNIST pipelines (the 28x28 eps UNet and the 16x16 flow-matching UNet, with the MNIST training split
as data) and the bundled class-conditional 16x16 Fashion-MNIST pipeline (no data: calibrated data-free, judged by
Inception FID against its bundled 500 test images, so the benchmarks need no dataset package)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from diffusers_timetuner import Denoiser
from diffusers_timetuner.testbeds import (
    load_fashion_pipeline,
    load_flow_gmm_model,
    load_gmm_model,
    load_mnist_flow_pipeline,
    load_mnist_pipeline,
)
from diffusers_timetuner.testbeds.data import downsample, load_mnist

from .families import NOISE_KEYS


@dataclass
class Testbed:
    """A model plus what the benchmarks need around it.

    model: the network given to `calibrate` and wrapped by `denoiser(guidance)`; sample_shape: (C, H, W);
    noise_config: the noise schedule (diffusers scheduler config); data/labels: real samples for calibration
    objectives that need data (MNIST: the training split, 16x16 for "mnist_flow"; None: the testbed is calibrated
    data-free only); num_classes: None for unconditional models; null_label: CFG null class; device: where the model
    (and the FD-MNIST classifier) runs.
    """

    name: str
    model: Any
    sample_shape: tuple
    noise_config: Dict[str, Any]
    data: Optional[torch.Tensor]
    labels: Optional[torch.Tensor] = None
    num_classes: Optional[int] = None
    null_label: Optional[int] = None
    pipeline: Any = None
    exact_sampler: Optional[Callable[[int, int], torch.Tensor]] = None  # (n, seed) -> exact samples (GMM only)
    device: torch.device = torch.device("cpu")
    extra: Dict[str, Any] = field(default_factory=dict)

    def denoiser(self, guidance_scale: float = 1.0) -> Denoiser:
        if self.num_classes is None or guidance_scale == 1.0:
            return Denoiser(self.model, guidance_scale=guidance_scale)
        return Denoiser(self.model, guidance_scale=guidance_scale, null_class_label=self.null_label)

    def labels_for(self, n: int, device) -> Optional[Dict[str, torch.Tensor]]:
        """Class labels 0..9 in turn (balanced) for n samples; None for unconditional models."""
        if self.num_classes is None:
            return None
        return {"class_labels": (torch.arange(n) % self.num_classes).to(device)}


_TESTBED_CACHE: Dict[tuple, Testbed] = {}


def load_testbed(name: str, device: torch.device) -> Testbed:
    key = (name, str(device))
    if key not in _TESTBED_CACHE:
        loaders = {"gmm": _load_gmm, "flow_gmm": _load_flow_gmm, "mnist": _load_mnist, "mnist_flow": _load_mnist_flow,
                   "fashion": _load_fashion}
        if name not in loaders:
            raise ValueError(f"unknown testbed {name!r}: choose from {sorted(loaders)}.")
        _TESTBED_CACHE[key] = loaders[name](torch.device(device))
    return _TESTBED_CACHE[key]


def _load_gmm(device: torch.device) -> Testbed:
    gmm = load_gmm_model().to(device)
    c = gmm.config
    noise_config = {k: c[k] for k in NOISE_KEYS if k in c}

    def exact(n: int, seed: int) -> torch.Tensor:
        return gmm.sample_data(n, generator=torch.Generator().manual_seed(seed)).float().cpu()

    data = exact(2048, 12345)  # calibration data x_0 (a draw disjoint from the evaluation draws)
    return Testbed("gmm", gmm, tuple(data.shape[1:]), noise_config, data, exact_sampler=exact, device=device)


def _load_flow_gmm(device: torch.device) -> Testbed:
    """The GMM's mixture under the rectified flow x_s = (1 - s) x_0 + s eps, with its exact velocity (timestep =
    s * 1000; the noise config is FlowMatchEuler's: only the number of training steps)."""
    model = load_flow_gmm_model().to(device)

    def exact(n: int, seed: int) -> torch.Tensor:
        return model.sample_data(n, torch.Generator().manual_seed(seed)).float().cpu()

    data = exact(2048, 12345)  # as for "gmm": a draw disjoint from the evaluation draws
    return Testbed("flow_gmm", model, tuple(data.shape[1:]),
                   {"num_train_timesteps": model.config.num_train_timesteps}, data, exact_sampler=exact,
                   device=device)


def _load_mnist(device: torch.device, pipe=None, name: str = "mnist") -> Testbed:
    pipe = pipe or load_mnist_pipeline(device)
    unet = pipe.unet.eval().requires_grad_(False)
    images, labels = load_mnist("train")  # calibration data: the training split (FD-MNIST uses the held-out one)
    size = unet.config.sample_size
    if name == "mnist_flow":
        images = downsample(images, size)  # the 16x16 flow UNet's training data
    if images.shape[-1] != size:
        raise ValueError(f"the MNIST model expects {size}x{size} images, the data are {images.shape[-1]}x"
                         f"{images.shape[-1]}")
    n_cls = int(unet.config.num_class_embeds) - 1
    return Testbed(
        name, unet, (unet.config.in_channels, size, size), dict(pipe.scheduler.config), images, labels,
        num_classes=n_cls, null_label=n_cls, pipeline=pipe, device=device,
    )


def _load_mnist_flow(device: torch.device) -> Testbed:
    """The 16x16 flow-matching MNIST UNet (velocity, FlowMatchEuler's config as its noise config)."""
    return _load_mnist(device, load_mnist_flow_pipeline(device), "mnist_flow")


def _load_fashion(device: torch.device) -> Testbed:
    # data=None: the Fashion-MNIST images come from a Debian package that only retraining needs; calibration here is
    # data-free (x_T ~ N(0, I), strategy="data_free"), so the testbed runs wherever the package is installed.
    pipe = load_fashion_pipeline(device)
    unet = pipe.unet.eval().requires_grad_(False)
    size = unet.config.sample_size
    n_cls = int(unet.config.num_class_embeds) - 1
    return Testbed("fashion", unet, (unet.config.in_channels, size, size), dict(pipe.scheduler.config), None,
                   num_classes=n_cls, null_label=n_cls, pipeline=pipe, device=device)
