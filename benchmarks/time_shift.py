"""Time-Shift sampler (Li et al., ICLR 2024), the closest training-free peer of TimeTuner.

Paper: Mingxiao Li, Tingyu Qu, Ruicong Yao, Wei Sun, Marie-Francine Moens, "Alleviating Exposure Bias in Diffusion
Models through Sampling with Shifted Time Steps", ICLR 2024, arXiv:2305.15583. Official code:
https://github.com/Mingxiao-Li/TS-DPM (DDIM/PNDM/DPM-Solver/DEIS backbones) and
https://github.com/tingyu215/TS-DPM-ADM (ADM backbone). This file follows the TS-DDIM of the latter,
``guided_diffusion_new/gaussian_diffusion.py``: ``ddim_sample`` and ``get_next_time_window`` (read, not copied).

Algorithm (per sample, at every step of a DDIM sampler on the grid t_K > ... > t_1):
1. The first step, and every step with t_i <= cutoff t_c, is the plain DDIM step from t_i.
2. Otherwise estimate the variance of the current state, ``var(x)`` over all its pixels (unbiased, as ``torch.var``),
   and pick, from the window of integer timesteps ``[t_i - w//2, t_i + w//2]`` (``[0, w]`` near t = 0), the
   timestep t_s whose noise variance ``1 - alpha_bar(t_s)`` is closest to it (squared difference).
3. Run the DDIM step *from t_s*: the network sees t_s and the x_0 prediction uses alpha_bar(t_s); the step lands on
   t_s - k (k = T // n, the DDIM stride), as the official code's ``alphas_cumprod_prev_all[next_t - ...]``. The next
   window is again centred on the grid time t_{i-1}.
Step 3 is exactly what diffusers' ``DDIMScheduler.step(eps, t_s, x)`` computes (``prev = t_s - T // n``), so the
update itself is the unchanged diffusers scheduler; the wrapper only chooses t_s. Samples of one batch may pick
different t_s: the batch is split into groups of equal t_s (at most w + 1 groups) for the network call and the step.
With ``window=0`` (or cutoff >= t_K) it is the plain DDIM sampler, bit for bit.

Difference from TimeTuner: the shift is chosen on the fly from the sample's statistics (training-free, no table) and
moves the solver's start time too, while TimeTuner keeps the grid and only changes what the network sees.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from diffusers import DDIMScheduler


class TimeShiftDDIM:
    """TS-DDIM sampling loop around an unchanged diffusers `DDIMScheduler`.

    Args:
        scheduler: a `DDIMScheduler` (its config sets the grid: spacing, steps_offset, noise schedule).
        window: window size w (number of candidate timesteps - 1, centred on the grid time).
        cutoff: cutoff time t_c: no shift once the grid time is at or below it (0 disables the shift, as in the
            official code).
    """

    def __init__(self, scheduler: DDIMScheduler, window: int, cutoff: int):
        if not isinstance(scheduler, DDIMScheduler):
            raise ValueError(f"TimeShiftDDIM needs a DDIMScheduler, got {type(scheduler).__name__}.")
        if int(window) < 0 or int(cutoff) < 0:
            raise ValueError(f"window and cutoff must be >= 0, got window={window}, cutoff={cutoff}.")
        self.scheduler = scheduler
        self.window = int(window)
        self.cutoff = int(cutoff)
        # 1 - alpha_bar(t): the noise variance of x_t under the forward process, for every training timestep.
        self.noise_var = 1.0 - scheduler.alphas_cumprod.double()
        self.last_shifts: List[List[int]] = []

    def candidates(self, t: int) -> torch.Tensor:
        """The window of training timesteps around grid time t (official code's slicing, clipped to [0, T-1])."""
        T = len(self.noise_var)
        half = self.window // 2
        lo, hi = (t - half, t + half + 1) if t - half > 0 else (0, self.window + 1)
        return torch.arange(max(lo, 0), min(hi, T))

    def shifted_times(self, x: torch.Tensor, t: int, first: bool) -> torch.Tensor:
        """t_s per sample (int64, shape (B,))."""
        batch = x.shape[0]
        # The official code disables the shift for cutoff == 0 and for t <= cutoff, and never shifts the first step.
        if first or self.cutoff == 0 or t <= self.cutoff or self.window == 0:
            return torch.full((batch,), t, dtype=torch.long)
        cand = self.candidates(t)
        var = x.detach().flatten(1).double().var(dim=1).cpu()  # (B,)
        dist = (var[:, None] - self.noise_var[cand][None, :]) ** 2
        return cand[dist.argmin(dim=1)]

    @torch.no_grad()
    def sample(self, denoiser, noise: torch.Tensor, num_inference_steps: int, cond: Optional[Dict] = None,
               eta: float = 0.0) -> torch.Tensor:
        """Sample from x_T = `noise` with `num_inference_steps` model evaluations (the DDIM grid's length)."""
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=noise.device)
        x = noise * sched.init_noise_sigma
        self.last_shifts = []
        for i, t in enumerate(sched.timesteps):
            t_s = self.shifted_times(x, int(t), first=(i == 0))
            self.last_shifts.append(t_s.tolist())
            x_next = torch.empty_like(x)
            for s in torch.unique(t_s).tolist():  # one group per distinct shifted time
                rows = (t_s == s).nonzero(as_tuple=True)[0].to(x.device)
                group_cond = None if cond is None else {
                    k: (v[rows] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in cond.items()}
                ts = torch.tensor(s, device=x.device)
                eps = denoiser(x[rows], ts, group_cond)
                x_next[rows] = sched.step(eps, int(s), x[rows], eta=eta).prev_sample
            x = x_next
        return x
