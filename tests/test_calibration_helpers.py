"""Tiny models for the calibration tests (imported by tests/test_calibration*.py and their subprocess scripts).

``GaussianEps`` is an exact noise predictor: for data x_0 ~ N(mu, v I) and x_t = alpha_t x_0 + sigma_t eps,
E[eps | x_t] = sigma_t (x_t - alpha_t mu) / (alpha_t^2 v + sigma_t^2), with alpha_t^2 = abar(t) linearly interpolated
at fractional t (the testbeds' convention). Two modes (a 1-D mixture would need no closed form for sampling
accuracy) are not needed: few-step DDIM on it still has a clear discretisation error that TimeTuner can reduce.
"""

import time

import torch


class GaussianEps(torch.nn.Module):
    def __init__(self, alphas_cumprod, mu=0.5, var=0.05, prediction_type="epsilon", delay=0.0, round_timesteps=False):
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.double().clone())
        self.mu, self.var = mu, var
        self.prediction_type = prediction_type
        self.delay = delay  # seconds per call: lets the kill/resume test catch the run mid-way
        self.round_timesteps = round_timesteps  # emulate a network whose timestep input ignores fractions
        self.calls = 0

    def forward(self, x, t, **kwargs):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if self.round_timesteps:
            t = t.round()
        t = t.clamp(0, len(self.abar) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(self.abar) - 1)
        w = t - lo
        a = (self.abar[lo] * (1 - w) + self.abar[hi] * w).view(-1, *([1] * (x.ndim - 1)))
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        xd = x.double()
        eps = sigma * (xd - alpha * self.mu) / (a * self.var + 1 - a)
        if self.prediction_type == "sample":
            return ((xd - sigma * eps) / alpha).float()
        if self.prediction_type == "v_prediction":  # v = alpha eps - sigma x_0
            return (alpha * eps - sigma * (xd - sigma * eps) / alpha).float()
        return eps.float()


def gaussian_data(n, shape=(1, 4, 4), mu=0.5, var=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mu + var**0.5 * torch.randn((n, *shape), generator=g)


def ddim(**kwargs):
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

    return TimeTunerDDIMScheduler(**{"clip_sample": False, **kwargs})


def tiny_unet(num_class_embeds=None, sample_size=8):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds).eval()
