"""Bundled consistency model of the digits mixture: layout, provenance hash, the exact teacher it was distilled from,
the EDM boundary condition, and that its recorded quality reproduces."""
import hashlib
import json
import os
import re

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

from diffusers_timetuner.testbeds import GMM_CM_MODEL_DIR, GMM_CM_MODEL_ID, load_gmm_cm_pipeline, load_gmm_model
from diffusers_timetuner.testbeds.gmm_cm import train

pytest.importorskip("sklearn", reason="the mixture's data need scikit-learn")
WEIGHTS = os.path.join(GMM_CM_MODEL_DIR, "unet", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def pipe():
    return load_gmm_cm_pipeline()


def test_bundled_layout_and_provenance(pipe):
    assert os.path.getsize(WEIGHTS) < 5 * 2**20
    assert isinstance(pipe, ConsistencyModelPipeline) and pipe.config._name_or_path == GMM_CM_MODEL_ID
    assert isinstance(pipe.scheduler, CMStochasticIterativeScheduler)
    c = pipe.scheduler.config  # what train.py distilled for
    assert (c.num_train_timesteps, c.sigma_min, c.sigma_max, c.sigma_data, c.clip_denoised) == (40, 0.002, 80.0, 0.5,
                                                                                                 False)
    for f in ("PROVENANCE.md", "train_log.txt", "eval.json", "grid.png", "train.py", "model.py"):
        assert os.path.isfile(os.path.join(GMM_CM_MODEL_DIR, f)), f
    text = open(os.path.join(GMM_CM_MODEL_DIR, "PROVENANCE.md")).read()
    recorded = re.search(r"weights sha256: `([0-9a-f]{64})`", text).group(1)
    assert hashlib.sha256(open(WEIGHTS, "rb").read()).hexdigest() == recorded


def test_exact_denoiser_is_the_mixtures_posterior_mean():
    # The VE state x = x_0 + sigma eps is the VP state x_t / sqrt(abar_t) with sigma^2 = (1 - abar_t) / abar_t; the
    # VP mixture with prediction_type="sample" returns E[x_0 | x_t] independently (gmm.py's score), so both agree.
    vp = load_gmm_model(prediction_type="sample")
    g = torch.Generator().manual_seed(0)
    x0 = vp.sample_data(6, g).double()
    for t in (20, 300, 900):
        abar = float(vp.alphas_cumprod[t])
        sigma = ((1 - abar) / abar) ** 0.5
        x_ve = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        want = vp(x_ve * abar ** 0.5, torch.tensor(float(t))).sample.double()
        got = train.exact_denoiser(vp, x_ve.reshape(6, -1), torch.full((6,), sigma, dtype=torch.float64))
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=1e-4)


def test_consistency_function_matches_the_scheduler_and_keeps_the_boundary(pipe):
    # train.py's f(x, sigma) must be what CMStochasticIterativeScheduler computes from the network's output
    sched = CMStochasticIterativeScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(1)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
    t = sched.timesteps[0]
    out = pipe.unet(sched.scale_model_input(x, t), t).sample
    want = sched.step(out, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    got = train.consistency_function(pipe.unet, x, torch.full((4,), float(sched.sigmas[0]), dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    at_min = train.consistency_function(pipe.unet, x, torch.full((4,), train.SIGMA_MIN, dtype=torch.float64))
    torch.testing.assert_close(at_min, x)  # c_skip(sigma_min) = 1, c_out(sigma_min) = 0


@pytest.mark.slow
def test_recorded_quality_reproduces(pipe):
    # eval.json was written by train.evaluate on these weights with this seed: the same call gives the same FDs
    recorded = json.load(open(os.path.join(GMM_CM_MODEL_DIR, "eval.json")))
    again = train.evaluate(pipe.unet, load_gmm_model(), recorded["seed"])
    for a, b in zip(again["rows"], recorded["rows"]):
        assert a["steps"] == b["steps"] and a["fd"] == pytest.approx(b["fd"], rel=1e-4)
    assert recorded["rows"][0]["fd"] > recorded["fd_exact_vs_exact"]  # a one-step model is not exact
