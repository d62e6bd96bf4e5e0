"""`ConsistencyMLP`: the network F of a consistency model on flat 8x8 images, called like the UNet a
`ConsistencyModelPipeline` drives: ``model(c_in * x, 250 * log(sigma)).sample``.

The scheduler (`CMStochasticIterativeScheduler`) forms the consistency function
f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, 250 log sigma); the network only sees the scaled state
and the float timestep, so a tuned timestep changes its input alone.
"""
import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..gmm import GaussianMixtureDenoiserOutput


class ConsistencyMLP(ModelMixin, ConfigMixin):
    """Residual MLP with a Fourier embedding of the timestep (c_noise = timestep / 250 = log sigma).

    Args:
        sample_size: image height = width. in_channels: channels C (D = C * H * W inputs).
        hidden: width of the residual blocks. depth: number of residual blocks. embed_dim: timestep features.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, hidden: int = 512, depth: int = 4,
                 embed_dim: int = 64):
        super().__init__()
        d = in_channels * sample_size * sample_size
        # fixed log-spaced frequencies over log sigma in [log 0.002, log 80] (a range of about 10.6)
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(0.1), math.log(20.0), embed_dim // 2)),
                             persistent=False)
        self.time_mlp = torch.nn.Sequential(torch.nn.Linear(embed_dim, hidden), torch.nn.SiLU(),
                                            torch.nn.Linear(hidden, hidden))
        self.inp = torch.nn.Linear(d, hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                torch.nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = torch.nn.Sequential(torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, d))

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        """F(sample, timestep) for (B, C, H, W) samples and a float timestep (scalar or (B,), 250 log sigma)."""
        if class_labels is not None:
            raise ValueError("ConsistencyMLP is unconditional: pass class_labels=None.")
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        if t.numel() != b:
            raise ValueError(f"timestep must be a scalar or have one entry per sample ({b}), got {t.numel()}.")
        angles = (t / 250.0)[:, None] * self.freqs[None]
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.inp(sample.reshape(b, -1).float()) + emb
        for block in self.blocks:
            h = h + block(h + emb)
        out = self.out(h).reshape(sample.shape).to(sample.dtype)
        return GaussianMixtureDenoiserOutput(sample=out) if return_dict else (out,)
