"""An exact-score diffusion "model": the noise prediction of a Gaussian-mixture data distribution.

If the data are x_0 ~ sum_k w_k N(mu_k, S_k) and x_t = a x_0 + s eps with a = sqrt(alpha_bar(t)),
s = sqrt(1 - alpha_bar(t)), then x_t ~ sum_k w_k N(a mu_k, a^2 S_k + s^2 I) and the ideal noise predictor is
eps*(x_t, t) = -s * grad log p_t(x_t). `GaussianMixtureDenoiser` returns exactly that (or the matching v / x_0
prediction), so every error a sampler makes with it is the sampler's own truncation error.

The noise level of a (possibly fractional) timestep follows the package's one rule,
`diffusers_timetuner.noise_schedule.alpha_bar_at` (re-exported here).
"""
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..noise_schedule import alpha_bar_at  # also exported as testbeds.alpha_bar_at

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def cached_decomposition(mixture: torch.nn.Module):
    """float64 (log w, mu, U, lambda) of a mixture's ``weights`` / ``means`` / ``covariances`` buffers (eigh of the
    symmetrised covariances), cached on ``mixture._cache`` until a buffer is replaced or changed in place."""
    key = (id(mixture.covariances), mixture.covariances._version, id(mixture.means), mixture.means._version,
           id(mixture.weights), mixture.weights._version, mixture.covariances.device)
    if mixture._cache_key != key:
        cov = mixture.covariances.double()
        lam, u = torch.linalg.eigh((cov + cov.transpose(1, 2)) / 2)
        mixture._cache = (mixture.weights.double().log(), mixture.means.double(), u, lam.clamp(min=0))
        mixture._cache_key = key
    return mixture._cache


class GaussianMixtureDenoiserOutput(BaseOutput):
    """Output of `GaussianMixtureDenoiser.forward`.

    Args:
        sample: the prediction (epsilon, v or x_0 per `config.prediction_type`), same shape and dtype as the input.
    """

    sample: torch.Tensor


class GaussianMixtureDenoiser(ModelMixin, ConfigMixin):
    """Exact noise prediction of a full-covariance Gaussian mixture, as a Diffusers model.

    Data are images (B, C, H, W) with D = C*H*W; the mixture lives in the flattened space. Call it like
    `UNet2DModel`: ``model(sample, timestep).sample``. Mixture parameters are (persistent, float32) buffers, so
    `save_pretrained` / `from_pretrained` round-trip them through safetensors; the config holds only sizes and the
    beta schedule (the same keys as a Diffusers scheduler). Computation is float64 internally, with the
    eigendecomposition S_k = U_k diag(lambda_k) U_k^T computed once and cached.

    Args:
        n_components: number of mixture components K.
        sample_size: image height/width (int) or (H, W).
        in_channels: image channels C.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the beta schedule, exactly as
            `DDPMScheduler` takes it (alphas_cumprod is read from a `DDPMScheduler` built with these).
        prediction_type: "epsilon", "v_prediction" or "sample".
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        n_components: int = 1,
        sample_size: Union[int, Sequence[int]] = 8,
        in_channels: int = 1,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[List[float]] = None,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        d = in_channels * h * w
        # Persistent float32 buffers (saved); the first floating buffer also sets `self.dtype` for pipelines.
        self.register_buffer("weights", torch.full((n_components,), 1.0 / n_components))
        self.register_buffer("means", torch.zeros(n_components, d))
        self.register_buffer("covariances", torch.eye(d).repeat(n_components, 1, 1))
        betas_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
        )
        self.register_buffer("alphas_cumprod", betas_scheduler.alphas_cumprod.double(), persistent=False)
        self._cache_key, self._cache = None, None

    # ------------------------------------------------------------------------------------------------------------
    # Constructors
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_parameters(
        cls,
        weights,
        means,
        covariances,
        sample_size: Union[int, Sequence[int]] = None,
        in_channels: int = 1,
        alphas_cumprod=None,
        **config,
    ) -> "GaussianMixtureDenoiser":
        """Build from explicit mixture parameters.

        Args:
            weights: (K,) non-negative, summing to 1.
            means: (K, D). covariances: (K, D, D) symmetric positive definite.
            sample_size: image size with in_channels * H * W = D (default: square H = W = sqrt(D / in_channels)).
            alphas_cumprod: optional (N,) table; converted to `trained_betas` (beta_i = 1 - ac_i / ac_{i-1}).
            **config: other config keys (beta schedule, prediction_type).
        """
        w, mu, cov = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (weights, means, covariances))
        if w.ndim != 1 or mu.ndim != 2 or cov.ndim != 3 or not (w.shape[0] == mu.shape[0] == cov.shape[0]):
            raise ValueError(
                f"Need weights (K,), means (K, D), covariances (K, D, D); got {tuple(w.shape)}, {tuple(mu.shape)}, "
                f"{tuple(cov.shape)}."
            )
        k, d = mu.shape
        if cov.shape[1:] != (d, d):
            raise ValueError(f"covariances must be (K, {d}, {d}), got {tuple(cov.shape)}.")
        if (w < 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be non-negative and sum to 1 (sum {float(w.sum())}).")
        if not torch.allclose(cov, cov.transpose(1, 2), atol=1e-8, rtol=1e-6):
            raise ValueError("covariances must be symmetric.")
        if torch.linalg.eigvalsh(cov).min() <= 0:
            raise ValueError("covariances must be positive definite (add a small ridge, e.g. 1e-4 * I).")
        if sample_size is None:
            side = int(round((d / in_channels) ** 0.5))
            if in_channels * side * side != d:
                raise ValueError(f"D={d} is not in_channels * H * W for a square image: pass sample_size=(H, W).")
            sample_size = side
        if alphas_cumprod is not None:
            if "trained_betas" in config:
                raise ValueError("Pass either alphas_cumprod or trained_betas, not both.")
            ac = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)
            if ac.ndim != 1 or len(ac) < 2 or (ac <= 0).any() or (ac > 1).any() or (ac[1:] > ac[:-1]).any():
                raise ValueError("alphas_cumprod must be a non-increasing 1-D table in (0, 1] with >= 2 entries.")
            betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
            config.update(trained_betas=betas.tolist(), num_train_timesteps=len(ac))
        model = cls(n_components=k, sample_size=sample_size, in_channels=in_channels, **config)
        h, wd = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        if in_channels * h * wd != d:
            raise ValueError(f"in_channels * H * W = {in_channels * h * wd} but the means have D = {d}.")
        with torch.no_grad():
            model.weights.copy_(w)
            model.means.copy_(mu)
            model.covariances.copy_((cov + cov.transpose(1, 2)) / 2)
        return model

    @classmethod
    def from_digits(
        cls, n_components: int = 10, seed: int = 0, reg_covar: float = 1e-3, max_iter: int = 200, **config
    ) -> "GaussianMixtureDenoiser":
        """Fit a full-covariance mixture to scikit-learn's 8x8 digits scaled to [-1, 1] (1797 images, D = 64).

        Args:
            n_components: K. seed: `random_state` of sklearn's `GaussianMixture` (k-means initialisation).
            reg_covar: ridge added to each covariance (border pixels are constant, so it must be > 0).
            **config: beta schedule / prediction_type keys (see the class docstring).
        """
        from sklearn.mixture import GaussianMixture

        from .data import load_sklearn_digits

        images, _ = load_sklearn_digits()
        x = images.reshape(images.shape[0], -1).double().numpy()
        gm = GaussianMixture(
            n_components=n_components, covariance_type="full", reg_covar=reg_covar, random_state=seed,
            max_iter=max_iter,
        ).fit(x)
        return cls.from_parameters(gm.weights_, gm.means_, gm.covariances_, sample_size=8, in_channels=1, **config)

    # ------------------------------------------------------------------------------------------------------------
    # Exact quantities
    # ------------------------------------------------------------------------------------------------------------
    def _decomposition(self):
        return cached_decomposition(self)

    def _timesteps(self, timestep, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if not t.is_floating_point():
            t = t.double()
        t = t.reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch}), got {t.numel()}.")
        return t

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) for flattened x (B, D) and timesteps t (B,), float64."""
        log_w, mu, u, lam = self._decomposition()
        a2 = alpha_bar_at(self.alphas_cumprod, t.double())  # (B,)
        a, s2 = a2.sqrt(), 1.0 - a2
        var = a2[:, None, None] * lam[None] + s2[:, None, None]  # (B, K, D) eigenvalues of a^2 S_k + s^2 I
        k, d, _ = u.shape
        u_flat = u.permute(1, 0, 2).reshape(d, k * d)  # columns: eigenvectors of all components (one matmul)
        # z_k = U_k^T (x - a mu_k), for all k at once
        z = (x @ u_flat).view(-1, k, d) - a[:, None, None] * torch.einsum("kd,kde->ke", mu, u)[None]
        log_p = log_w[None] - 0.5 * (var.log().sum(-1) + (z * z / var).sum(-1))  # (B, K) up to a constant
        resp = torch.softmax(log_p, dim=1)  # posterior of component k given x_t
        weighted = (resp[:, :, None] * z / var).reshape(-1, k * d)
        return -weighted @ u_flat.T  # sum_k resp_k U_k diag(1/var_k) U_k^T (x - a mu_k)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """Exact prediction at noisy `sample` (B, C, H, W) and `timestep` (scalar or (B,); fractional allowed).

        Args:
            sample: x_t.
            timestep: t; its noise level is `alpha_bar_at(alphas_cumprod, t)`.
            class_labels: must be None (the mixture is unconditional).
            return_dict: return `GaussianMixtureDenoiserOutput` (else a tuple).
        """
        if class_labels is not None:
            raise ValueError("GaussianMixtureDenoiser is unconditional: pass class_labels=None.")
        b = sample.shape[0]
        if sample[0].numel() != self.means.shape[1]:
            raise ValueError(
                f"Expected samples with {self.means.shape[1]} values each, got shape {tuple(sample.shape)}."
            )
        x = sample.reshape(b, -1).double()
        t = self._timesteps(timestep, b, sample.device)
        eps = -self.score(x, t) * (1.0 - alpha_bar_at(self.alphas_cumprod, t.double())).sqrt()[:, None]
        out = self._convert(eps, x, t)
        out = out.reshape(sample.shape).to(sample.dtype)
        if not return_dict:
            return (out,)
        return GaussianMixtureDenoiserOutput(sample=out)

    def _convert(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """epsilon -> the configured parameterisation (x_0 = (x - s eps) / a, v = a eps - s x_0)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return eps
        a2 = alpha_bar_at(self.alphas_cumprod, t.double())[:, None]
        a, s = a2.sqrt(), (1.0 - a2).sqrt()
        x0 = (x - s * eps) / a
        return x0 if kind == "sample" else a * eps - s * x0

    @torch.no_grad()
    def sample_data(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n exact samples of the data distribution, float32 (n, C, H, W).

        A component k is drawn with probability w_k, then x = mu_k + U_k sqrt(lambda_k) z with z ~ N(0, I).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        log_w, mu, u, lam = self._decomposition()
        dev = self.means.device
        comp = torch.multinomial(log_w.exp().cpu(), n, replacement=True, generator=generator).to(dev)
        z = torch.randn(n, mu.shape[1], generator=generator, dtype=torch.float64).to(dev)
        x = mu[comp] + torch.einsum("nde,ne->nd", u[comp], lam[comp].sqrt() * z)
        h, w = self._hw()
        return x.reshape(n, self.config.in_channels, h, w).float()

    def _hw(self):
        size = self.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)
