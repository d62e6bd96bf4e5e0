"""alpha_bar at fractional timesteps: the package's one rule (noise_schedule.py), its edges and its two users."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_timetuner.calibration.rollout import alpha_sigma_at
from diffusers_timetuner.noise_schedule import alpha_bar_at
from diffusers_timetuner.testbeds import alpha_bar_at as gmm_alpha_bar_at


def _table():
    return DDIMScheduler().alphas_cumprod.double()  # 1000 linear-beta steps


def test_edges_of_the_rule():
    ac = _table()
    n = ac.shape[0]
    assert float(alpha_bar_at(ac, 0.0)) == float(ac[0])
    assert float(alpha_bar_at(ac, float(n - 1))) == float(ac[n - 1])  # the last entry exactly, from both sides
    assert float(alpha_bar_at(ac, -1.0)) == 1.0  # clean data
    assert float(alpha_bar_at(ac, -0.5)) == pytest.approx(0.5 * (1.0 + float(ac[0])))  # halfway to alpha_bar(-1)
    last_alpha = ac[n - 1] / ac[n - 2]  # 1 - beta_{N-1}: the schedule continues with its last beta beyond N-1
    assert float(alpha_bar_at(ac, n - 1 + 2.0)) == pytest.approx(float(ac[n - 1] * last_alpha ** 2), rel=1e-12)
    with pytest.raises(ValueError, match=">= -1"):
        alpha_bar_at(ac, -1.01)
    with pytest.raises(ValueError, match="finite"):
        alpha_bar_at(ac, float("inf"))


def test_the_testbeds_and_calibration_use_the_same_function_and_agree_inside_the_range():
    assert gmm_alpha_bar_at is alpha_bar_at
    sched = DDIMScheduler()
    ac = sched.alphas_cumprod.to(torch.float64)
    t = torch.tensor([0.0, 0.25, 1.0, 437.3, 998.5, 999.0], dtype=torch.float64)
    # the clamped interpolation rollout.py used before the rule was shared: identical inside [0, T-1]
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(ac) - 1)
    old = ac[lo] * (1 - (t - lo)) + ac[hi] * (t - lo)
    assert torch.equal(alpha_bar_at(ac, t), old)
    alpha, sigma = alpha_sigma_at(sched, t)
    assert torch.equal(alpha, old.sqrt().float()) and torch.equal(sigma, (1 - old).sqrt().float())


def test_gradient_flows_through_a_fractional_time():
    ac = _table()
    t = torch.tensor(437.3, dtype=torch.float64, requires_grad=True)
    alpha_bar_at(ac, t).backward()
    assert float(t.grad) == pytest.approx(float(ac[438] - ac[437]))  # slope of the linear piece
