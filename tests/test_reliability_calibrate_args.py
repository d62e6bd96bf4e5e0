"""calibrate() refuses impossible arguments before any network evaluation, and stops at the first non-finite output."""

import math

import pytest
import torch

from diffusers_timetuner.calibration import calibrate
from test_calibration_helpers import GaussianEps, ddim, gaussian_data

SHAPE = (1, 4, 4)


class NeverCalled(torch.nn.Module):
    """A network whose evaluation fails the test: the argument checks must come first."""

    def forward(self, x, t, **kw):
        pytest.fail("the network was evaluated before the arguments were checked")


def _kw(**overrides):
    kw = dict(num_inference_steps=4, num_samples=4, batch_size=4, num_validation_samples=4, num_heldout_samples=4,
              sample_shape=SHAPE, progress=False)
    kw.update(overrides)
    return kw


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"num_validation_samples": -1}, r"num_validation_samples must be an integer >= 0, got -1"),
        ({"num_heldout_samples": -2}, r"num_heldout_samples must be an integer >= 1, got -2"),
        ({"num_heldout_samples": 0}, r"num_heldout_samples must be an integer >= 1, got 0"),
        ({"eta": math.nan}, r"eta must be a finite number, got nan"),
        ({"guard_margin": math.inf}, r"guard_margin must be a finite number, got inf"),
        ({"teacher_steps": -5}, r"teacher_steps must be an integer above every step count calibrated \(4\)"),
        ({"teacher_steps": 3}, r"teacher_steps must be an integer above every step count calibrated \(4\)"),
        ({"teacher_steps": 4}, r"teacher_steps must be an integer above every step count calibrated \(4\)"),
        ({"num_inference_steps": 10.7}, r"num_inference_steps must be positive integers, got 10.7"),
        ({"num_inference_steps": [4, 0]}, r"num_inference_steps must be positive integers"),
        ({"data": torch.zeros(0, *SHAPE), "strategy": "sequential"}, r"data must hold at least one sample"),
        ({"data": torch.zeros(8, 1, 8, 8), "strategy": "sequential"},
         r"data has samples of shape \(1, 8, 8\) but sample_shape=\(1, 4, 4\)"),
        ({"data": torch.full((8, *SHAPE), math.nan), "strategy": "sequential"},
         r"data has non-finite values \(NaN or inf\) in 8 of its 8 samples"),
        ({"sample_shape": (1, -4, 4)}, r"sample_shape must be positive integers"),
    ],
)
def test_bad_arguments_fail_before_the_network_runs(overrides, match):
    with pytest.raises(ValueError, match=match):
        calibrate(NeverCalled(), ddim(), **_kw(**overrides))


class NaNBelow(GaussianEps):
    """The exact Gaussian model, but NaN for every timestep below `threshold` (finite at the probe, t ~ 500)."""

    def __init__(self, abar, threshold):
        super().__init__(abar)
        self.threshold = threshold

    def forward(self, x, t, **kw):
        out = super().forward(x, t, **kw)
        if float(t.reshape(-1)[0]) < self.threshold:
            out = out * math.nan
        return out


def test_network_returning_nan_stops_at_the_probe():
    sched = ddim()
    net = NaNBelow(sched.alphas_cumprod, threshold=2000.0)  # NaN everywhere
    # the probe evaluates the network at num_train_timesteps // 2 = 500 first
    with pytest.raises(ValueError, match=r"NaNBelow returned non-finite values \(NaN or inf\) at timestep\(s\) \[500.0\]"):
        calibrate(net, sched, **_kw())
    assert net.calls <= 1


def test_network_returning_nan_mid_trajectory_names_the_timestep():
    sched = ddim()
    # Before any step is tuned, calibrate() runs the untuned 4-step sampler (grid [750, 500, 250, 0]) once to refuse
    # a sampler that already ends non-finite: NaN below t = 300 hits it at its step 2 (grid t = 250).
    net = NaNBelow(sched.alphas_cumprod, threshold=300.0)
    with pytest.raises(ValueError, match=r"NaNBelow returned non-finite values \(NaN or inf\) at step 2 of the 4-step "
                                         r"sampler \(grid t = 250\), fed tau \[250"):
        calibrate(net, sched, **_kw(data=gaussian_data(8), strategy="sequential"))


class NaNBetween(GaussianEps):
    """The exact Gaussian model, but NaN for timesteps strictly between `lo` and `hi`."""

    def __init__(self, abar, lo, hi):
        super().__init__(abar)
        self.lo, self.hi = lo, hi

    def forward(self, x, t, **kw):
        out = super().forward(x, t, **kw)
        return out * math.nan if self.lo < float(t.reshape(-1)[0]) < self.hi else out


def test_network_returning_nan_in_the_teacher_says_teacher():
    sched = ddim()
    # The coarse grid [750, 500, 250, 0] and the probe (500, 500.5) miss (600, 700); the many-step teacher, computed
    # before any tau is tried, steps through that range first.
    net = NaNBetween(sched.alphas_cumprod, 600.0, 700.0)
    with pytest.raises(ValueError, match=r"NaNBetween returned non-finite values \(NaN or inf\) in the \d+-step teacher "
                                         r"sampler, fed timestep\(s\) \[6"):
        calibrate(net, sched, **_kw(data=gaussian_data(8), strategy="sequential"))


class BadAtTunedTaus(GaussianEps):
    """The exact Gaussian model, but `value` at every fractional timestep below `threshold`: only a candidate tau
    gets it (the probe at 500 / 500.x, the teacher and the grid times are unaffected)."""

    def __init__(self, abar, threshold, value):
        super().__init__(abar)
        self.threshold, self.value = threshold, value

    def forward(self, x, t, **kw):
        out = super().forward(x, t, **kw)
        t0 = float(t.reshape(-1)[0])
        return torch.full_like(out, self.value) if t0 < self.threshold and t0 != round(t0) else out


def test_network_returning_nan_at_a_tau_names_the_step_its_grid_time_and_the_tau():
    sched = ddim()
    # grid [750, 500, 250, 0]; the searches at 750 and 500 stay above 300, the one at t = 250 tries 262.5 first
    net = BadAtTunedTaus(sched.alphas_cumprod, threshold=300.0, value=math.nan)
    with pytest.raises(ValueError, match=r"BadAtTunedTaus returned non-finite values \(NaN or inf\) at step 2 of the "
                                         r"4-step sampler \(grid t = 250\), fed tau \[262\.5\], for an input with "
                                         r"finite values"):
        calibrate(net, sched, objective="teacher_local", **_kw())


def test_network_returning_nan_at_a_grid_time_names_the_step():
    """Eq. 9 evaluates the network at the grid time of the next step: a NaN there names that step."""
    sched = ddim()
    net = BadAtTunedTaus(sched.alphas_cumprod, threshold=2000.0, value=3e38)  # finite, but x overflows to inf
    with pytest.raises(ValueError, match=r"returned non-finite values \(NaN or inf\) at step 1 of the 4-step sampler "
                                         r"\(grid t = 500\), fed the grid time \[500\.0\], for an input with "
                                         r"non-finite values"):
        calibrate(net, sched, objective="paper", data=gaussian_data(8), strategy="sequential", **_kw())


def test_finite_outputs_giving_a_non_finite_loss_stop_the_run():
    """3e38 is finite in float32, but DDIM's x0 = (x - sigma eps) / alpha at t = 750 (alpha = 0.057) overflows to
    inf, and the teacher_local loss with it: the run stops there instead of treating the candidate as merely bad."""
    sched = ddim()
    net = BadAtTunedTaus(sched.alphas_cumprod, threshold=2000.0, value=3e38)
    with pytest.raises(ValueError, match=r"The teacher_local loss is not finite \(NaN or inf\) for 4 of 4 samples at "
                                         r"step 0 of the 4-step sampler \(grid t = 750\) with tau = 762\.5, although "
                                         r"the network's outputs there were finite"):
        calibrate(net, sched, objective="teacher_local", **_kw())
