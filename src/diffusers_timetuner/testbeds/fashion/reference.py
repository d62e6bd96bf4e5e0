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


def _test_images(block: int):
    """Block `block` of 50 per class of the seeded test permutation (block 0 is the reference), 16x16 uint8."""
    from ..data import downsample, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    order = np.random.default_rng(REFERENCE_SEED).permutation(len(labels))
    y = labels.numpy()[order]
    lo, hi = block * REFERENCE_PER_CLASS, (block + 1) * REFERENCE_PER_CLASS
    keep = np.concatenate([order[y == c][lo:hi] for c in range(10)])
    small = downsample(images[keep], SAMPLE_SIZE)
    return torch.round((small + 1.0) * 127.5).clamp(0, 255).to(torch.uint8), labels[keep]


def build_reference(path: str = REFERENCE_FILE) -> None:
    uint8, labels = _test_images(0)
    np.savez_compressed(path, images=uint8.numpy(), labels=labels.numpy().astype(np.uint8))


def real_data_level(reference_features=None) -> dict:
    """FID / precision / recall of 500 *other* real test images (block 1 of the same permutation) against the
    reference: the level a perfect model reaches at this sample size. Needs the Debian data."""
    from ...inception import InceptionFeatures, fid, precision_recall

    ref = reference_features if reference_features is not None else InceptionFeatures(batch_size=25)(
        load_reference()[0])
    other = InceptionFeatures(batch_size=25)(_test_images(1)[0].float() / 127.5 - 1.0)
    precision, recall = precision_recall(ref, other, k=3)
    return {"fid": fid(ref, other), "precision": precision, "recall": recall, "n": int(other.shape[0])}


if __name__ == "__main__":
    build_reference()
    print(f"wrote {REFERENCE_FILE}")
    print("real data vs reference:", real_data_level())
