"""The continuous-time UniPC of benchmarks/peers_grid/continuous.py against diffusers' UniPCMultistepScheduler, and
LD3 trained through it."""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from benchmarks.peers_grid import ld3
from benchmarks.peers_grid.continuous import SOLVERS, ContinuousSchedule, sample
from diffusers_timetuner import TimeTunerUniPCMultistepScheduler

# the package's UniPC settings for VP models (diffusers' defaults, spelled out)
UNIPC = dict(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
             final_sigmas_type="zero")
# diffusers steps in float32, the continuous sampler in float64. The first data prediction divides by
# alpha_999 ~ 6.4e-3 on the linear schedule, so float32 rounding (1.2e-7) grows to ~2e-5 relative; 1e-4 is a few
# times that (observed: <= 4e-6 at NFE 4-10), while UniPC and its predictor alone (DPM-Solver++(2M)) differ by
# 3e-2 .. 3e-1 relative on these grids.
RTOL = 1e-4


def _gmm():
    from benchmarks.evaluation import seeded_noise
    from benchmarks.testbeds import load_testbed

    torch.set_num_threads(1)
    tb = load_testbed("gmm", torch.device("cpu"))
    den = tb.denoiser()
    model = lambda x, t: den(x, torch.as_tensor(t, dtype=torch.float32), None)  # noqa: E731
    return tb, model, seeded_noise(8, tb.sample_shape, 0)


def _diffusers_loop(sched, model, x_T):
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
    return x


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("nfe", [4, 5, 6, 10])
def test_unipc_matches_diffusers_on_the_default_grid(nfe):
    tb, model, x_T = _gmm()
    tt = TimeTunerUniPCMultistepScheduler(**tb.noise_config, **UNIPC)
    tt.set_timesteps(nfe)
    ref_sched = UniPCMultistepScheduler(**tb.noise_config, **UNIPC)
    ref_sched.set_timesteps(nfe)
    assert torch.equal(tt.timesteps, ref_sched.timesteps)
    grid = [int(t) for t in tt.timesteps]
    ref = _diffusers_loop(ref_sched, model, x_T)
    times = torch.tensor(grid + [-1.0], dtype=torch.float64)
    with torch.no_grad():
        schedule = ContinuousSchedule.from_scheduler(tt)
        out = sample(model, x_T, times, None, "unipc", schedule)
        dpmpp = sample(model, x_T, times, None, "dpmpp", schedule)
    assert _rel(out, ref) < RTOL
    assert _rel(dpmpp, ref) > 100 * RTOL  # the corrector matters: the comparison can tell the solvers apart


@pytest.mark.parametrize("nfe", [3, 6])
def test_unipc_matches_diffusers_on_a_grid_that_stops_short_of_alpha_bar_one(nfe):
    # final_sigmas_type="sigma_min" ends at k = 0 instead of k = -1: the last step is then a real predictor step,
    # first order by lower_order_final (the step into k = -1 returns the data prediction whatever its order)
    tb, model, x_T = _gmm()
    ref_sched = UniPCMultistepScheduler(**tb.noise_config, **dict(UNIPC, final_sigmas_type="sigma_min"))
    ref_sched.set_timesteps(nfe)
    ref = _diffusers_loop(ref_sched, model, x_T)
    times = torch.tensor([float(t) for t in ref_sched.timesteps] + [0.0], dtype=torch.float64)
    with torch.no_grad():
        out = sample(model, x_T, times, None, "unipc", ContinuousSchedule.from_scheduler(ref_sched))
    assert _rel(out, ref) < RTOL


def test_unipc_sends_taus_to_the_network_only():
    # A TimeTuner tau table on the default NFE-5 grid: the scheduler steps on the grid's sigmas, the network sees
    # the taus. The continuous sampler with the same taus must agree with it and differ from taus = times.
    tb, model, x_T = _gmm()
    taus = [999.0, 805.5, 590.0, 407.25, 195.0]
    base = TimeTunerUniPCMultistepScheduler(**tb.noise_config, **UNIPC)
    base.set_timesteps(5)
    grid = [int(t) for t in base.timesteps]
    sched = base.with_tuned_timesteps(5, taus, grid=grid)
    sched.set_timesteps(5)
    assert [float(t) for t in sched.timesteps] == pytest.approx(taus)
    ref = _diffusers_loop(sched, model, x_T)
    times = torch.tensor(grid + [-1.0], dtype=torch.float64)
    schedule = ContinuousSchedule.from_scheduler(base)
    with torch.no_grad():
        out = sample(model, x_T, times, torch.tensor(taus, dtype=torch.float64), "unipc", schedule)
        plain = sample(model, x_T, times, None, "unipc", schedule)
    assert _rel(out, ref) < RTOL
    assert _rel(plain, out) > 100 * RTOL


def test_unipc_is_differentiable_in_x_T_times_and_taus():
    tb, model, x_T = _gmm()
    schedule = ContinuousSchedule.from_scheduler(TimeTunerUniPCMultistepScheduler(**tb.noise_config, **UNIPC))
    times = torch.tensor([999.0, 780.3, 541.7, 322.9, 151.2, 40.6, -1.0], dtype=torch.float64, requires_grad=True)
    taus = torch.tensor([999.0, 777.0, 545.1, 320.4, 153.0, 38.8], dtype=torch.float64, requires_grad=True)
    x = x_T.clone().requires_grad_(True)
    out = sample(model, x, times, taus, "unipc", schedule)
    out.pow(2).sum().backward()
    for name, g in (("x_T", x.grad), ("times", times.grad[:-1]), ("taus", taus.grad)):
        assert torch.isfinite(g).all(), name
        assert (g != 0).all(), name
    # the end point k = -1 only marks the last step as the jump to the data prediction
    assert float(times.grad[-1]) == 0.0


def test_unknown_solver_names_the_choices():
    assert "unipc" in SOLVERS
    with pytest.raises(ValueError, match="unipc"):
        sample(lambda x, t: x, torch.zeros(1, 2), torch.tensor([999.0, -1.0]), None, "heun",
               ContinuousSchedule(torch.linspace(0.99, 0.01, 1000)))


def test_ld3_trains_through_unipc():
    tb, model, x_T = _gmm()
    noise = torch.cat([x_T, torch.randn((8, *tb.sample_shape), generator=torch.Generator().manual_seed(1))])
    teacher = UniPCMultistepScheduler(**tb.noise_config, **UNIPC)
    teacher.set_timesteps(40)
    target = _diffusers_loop(teacher, model, noise)
    schedule = ContinuousSchedule.from_scheduler(teacher)
    cfg = ld3.LD3Config(num_train=8, num_valid=8, rounds_v1=1, rounds_v2=1)
    res = ld3.train_ld3(lambda labels: model, noise[:8], target[:8], noise[8:], target[8:], 4, "unipc", schedule, cfg)
    times = torch.tensor(res.times)
    assert torch.isfinite(times).all() and torch.all(times[1:] < times[:-1]) and len(res.taus) == 4
    # training moved the grid and lowered the validation loss of the uniform start
    assert res.valid_loss < res.valid_loss_init
