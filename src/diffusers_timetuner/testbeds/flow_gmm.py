"""An exact-velocity flow-matching "model": the rectified-flow velocity of a Gaussian-mixture data distribution.

Under the rectified-flow interpolation x_s = (1 - s) x_0 + s eps (s in [0, 1], eps ~ N(0, I)), a mixture
x_0 ~ sum_k w_k N(mu_k, S_k) gives x_s ~ sum_k w_k N((1 - s) mu_k, (1 - s)^2 S_k + s^2 I), and the ideal velocity
(what a flow-matching network learns with the loss ||v_theta(x_s, s) - (eps - x_0)||^2) is

    v*(x, s) = E[eps - x_0 | x_s = x] = sum_k r_k(x, s) (E_k[eps | x] - E_k[x_0 | x]),

with r_k the posterior of component k and, in the eigenbasis S_k = U_k diag(lambda) U_k^T,
z = U_k^T (x - (1 - s) mu_k),
var = (1 - s)^2 lambda + s^2:  E_k[eps | x] = U_k (s z / var),  E_k[x_0 | x] = mu_k + U_k ((1 - s) lambda z / var).
Both are finite at s = 0 and s = 1. `FlowMatchingGaussianMixture` returns exactly that, so every error a
flow-matching sampler makes with it is the sampler's own truncation error.

Call convention: that of the transformers `FlowMatchEulerDiscreteScheduler` pipelines drive (SD3 passes
``timestep = sigma * 1000`` as a float tensor): ``model(sample, timestep).sample`` with
s = timestep / ``num_train_timesteps``.
"""
from typing import Optional, Sequence, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .gmm import GaussianMixtureDenoiser, GaussianMixtureDenoiserOutput, cached_decomposition


class FlowMatchingGaussianMixture(ModelMixin, ConfigMixin):
    """Exact flow-matching velocity v = E[eps - x_0 | x_s] of a full-covariance Gaussian mixture, as a Diffusers model.

    Data are images (B, C, H, W), D = C*H*W; the mixture lives in the flattened space. Mixture parameters are
    persistent float32 buffers (`save_pretrained` / `from_pretrained` round-trip them); computation is float64.

    Args:
        n_components: number of mixture components K.
        sample_size: image height/width (int) or (H, W).
        in_channels: image channels C.
        num_train_timesteps: the timestep of s = 1 (1000 as in `FlowMatchEulerDiscreteScheduler`).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, n_components: int = 1, sample_size: Union[int, Sequence[int]] = 8, in_channels: int = 1,
                 num_train_timesteps: int = 1000):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}.")
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        d = in_channels * h * w
        self.register_buffer("weights", torch.full((n_components,), 1.0 / n_components))
        self.register_buffer("means", torch.zeros(n_components, d))
        self.register_buffer("covariances", torch.eye(d).repeat(n_components, 1, 1))
        self._cache_key, self._cache = None, None

    # ------------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_parameters(cls, weights, means, covariances, sample_size=None, in_channels: int = 1,
                        num_train_timesteps: int = 1000) -> "FlowMatchingGaussianMixture":
        """Build from explicit mixture parameters (checked as `GaussianMixtureDenoiser.from_parameters` does)."""
        vp = GaussianMixtureDenoiser.from_parameters(weights, means, covariances, sample_size=sample_size,
                                                     in_channels=in_channels)
        return cls.from_mixture(vp, num_train_timesteps=num_train_timesteps)

    @classmethod
    def from_mixture(cls, mixture: GaussianMixtureDenoiser, num_train_timesteps: int = 1000):
        """The same mixture as a (VP, noise-predicting) `GaussianMixtureDenoiser`, under the rectified flow."""
        cfg = mixture.config
        model = cls(n_components=cfg.n_components, sample_size=cfg.sample_size, in_channels=cfg.in_channels,
                    num_train_timesteps=num_train_timesteps)
        with torch.no_grad():
            for name in ("weights", "means", "covariances"):
                getattr(model, name).copy_(getattr(mixture, name))
        return model

    @classmethod
    def from_digits(cls, n_components: int = 10, seed: int = 0, **kwargs) -> "FlowMatchingGaussianMixture":
        """Fit to scikit-learn's 8x8 digits in [-1, 1] (see `GaussianMixtureDenoiser.from_digits`)."""
        return cls.from_mixture(GaussianMixtureDenoiser.from_digits(n_components=n_components, seed=seed, **kwargs))

    # ------------------------------------------------------------------------------------------------ exact quantities
    def _decomposition(self):
        return cached_decomposition(self)

    def sigmas_of(self, timestep, batch: int, device) -> torch.Tensor:
        """s = timestep / num_train_timesteps as float64 (B,); refuses s outside [0, 1] or non-finite values."""
        t = torch.as_tensor(timestep, device=device).double().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch}), got {t.numel()}.")
        s = t / float(self.config.num_train_timesteps)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or bool((s > 1).any()):
            raise ValueError(
                f"timesteps must lie in [0, {self.config.num_train_timesteps}] (s = timestep / "
                f"{self.config.num_train_timesteps} in [0, 1]); got {t.min().item()} .. {t.max().item()}."
            )
        return s

    def _posterior(self, x: torch.Tensor, s: torch.Tensor):
        """Responsibilities r (B, K), z = U^T (x - (1 - s) mu) (B, K, D), var (B, K, D), eigen-parts."""
        log_w, mu, u, lam = self._decomposition()
        a = 1.0 - s
        var = (a * a)[:, None, None] * lam[None] + (s * s)[:, None, None]
        k, d, _ = u.shape
        u_flat = u.permute(1, 0, 2).reshape(d, k * d)
        z = (x @ u_flat).view(-1, k, d) - a[:, None, None] * torch.einsum("kd,kde->ke", mu, u)[None]
        log_p = log_w[None] - 0.5 * (var.log().sum(-1) + (z * z / var).sum(-1))
        return torch.softmax(log_p, dim=1), z, var, u_flat, lam, log_p

    def log_prob(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log p_s(x) for flattened x (B, D) and s (B,), float64 (the exact marginal density; for checks)."""
        _, _, _, _, _, log_p = self._posterior(x, s)
        d = x.shape[1]
        return torch.logsumexp(log_p, dim=1) - 0.5 * d * np.log(2 * np.pi)

    def velocity(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """v*(x, s) = E[eps - x_0 | x_s = x] for flattened x (B, D) and s (B,), float64."""
        resp, z, var, u_flat, lam, _ = self._posterior(x, s)
        mu = self._decomposition()[1]  # cached by _posterior's call
        k, d = mu.shape
        coef = (s[:, None, None] - (1.0 - s)[:, None, None] * lam[None]) / var  # eps part minus x0 part, eigenbasis
        v = (resp[:, :, None] * coef * z).reshape(-1, k * d) @ u_flat.T
        return v - resp @ mu

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float], return_dict: bool = True, **unused):
        """Exact velocity at `sample` (B, C, H, W) and `timestep` = s * num_train_timesteps (scalar or (B,)).

        Args:
            sample: x_s. timestep: the flow time in timestep units (fractional allowed).
            return_dict: return an output with ``.sample`` (else a tuple).
            **unused: conditioning keywords must be absent or None (the mixture is unconditional).
        """
        given = sorted(k for k, v in unused.items() if v is not None)
        if given:
            raise ValueError(f"FlowMatchingGaussianMixture is unconditional: got {', '.join(given)}.")
        b = sample.shape[0]
        if sample[0].numel() != self.means.shape[1]:
            raise ValueError(f"Expected samples with {self.means.shape[1]} values each, "
                             f"got shape {tuple(sample.shape)}.")
        v = self.velocity(sample.reshape(b, -1).double(), self.sigmas_of(timestep, b, sample.device))
        out = v.reshape(sample.shape).to(sample.dtype)
        return GaussianMixtureDenoiserOutput(sample=out) if return_dict else (out,)

    @torch.no_grad()
    def sample_data(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n exact samples of the data distribution (s = 0), float32 (n, C, H, W)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        log_w, mu, u, lam = self._decomposition()
        comp = torch.multinomial(log_w.exp().cpu(), n, replacement=True, generator=generator).to(mu.device)
        z = torch.randn(n, mu.shape[1], generator=generator, dtype=torch.float64).to(mu.device)
        x = mu[comp] + torch.einsum("nde,ne->nd", u[comp], lam[comp].sqrt() * z)
        size = self.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return x.reshape(n, self.config.in_channels, h, w).float()
