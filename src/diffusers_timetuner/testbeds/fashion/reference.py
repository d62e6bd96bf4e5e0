"""The bundled Fashion-MNIST reference set: 500 test images (50 per class) at 16x16, the testbed's FID reference.

Shipping 128 KB of images lets FID against real clothes be measured without the Debian data package (the 2048-d
Inception statistics would be 32 MB). The images are the first 50 of each class in a seeded permutation
(``numpy.random.default_rng(0)``) of the 10000 test images, area-downsampled to 16x16 (as the model was trained)
and quantised to uint8, as a saved image would be.

Rebuild (needs Debian's dataset-fashion-mnist):
    PYTHONPATH=src python -m diffusers_timetuner.testbeds.fashion.reference
"""
import os
from typing import Tuple

import numpy as np
import torch

REFERENCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_test_16px.npz")
REFERENCE_PER_CLASS = 50
REFERENCE_SEED = 0
SAMPLE_SIZE = 16


def load_reference() -> Tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): float32 (500, 1, 16, 16) in [-1, 1] (uint8 / 127.5 - 1) and int64 (500,)."""
    with np.load(REFERENCE_FILE) as z:
        images, labels = z["images"], z["labels"]
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0), torch.from_numpy(labels.astype(np.int64))


def build_reference(path: str = REFERENCE_FILE) -> None:
    from ..data import downsample, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    order = np.random.default_rng(REFERENCE_SEED).permutation(len(labels))
    y = labels.numpy()[order]
    keep = np.concatenate([order[y == c][:REFERENCE_PER_CLASS] for c in range(10)])
    small = downsample(images[keep], SAMPLE_SIZE)
    uint8 = torch.round((small + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    np.savez_compressed(path, images=uint8, labels=labels.numpy()[keep].astype(np.uint8))


if __name__ == "__main__":
    build_reference()
    print(f"wrote {REFERENCE_FILE}")
