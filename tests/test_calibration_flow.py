"""Calibration of the flow-matching, UniPC, Heun and consistency-model schedulers: tables that differ from tau = t,
reload and sample; guidance; custom sigmas and dynamic shift; the conversions; clear errors."""

import pytest
import torch

from diffusers_timetuner import (
    TimeTunerFlowMatchEulerDiscreteScheduler,
    TimeTunerHeunDiscreteScheduler,
    TimeTunerUniPCMultistepScheduler,
)
from diffusers_timetuner.calibration import calibrate
from diffusers_timetuner.calibration.families import scheduler_class
from diffusers_timetuner.calibration.prediction import alpha_sigma_at, to_epsilon
from diffusers_timetuner.sampling import sample
from diffusers_timetuner.testbeds import load_flow_gmm_model, load_gmm_model
from test_calibration_helpers import tiny_unet

FLOW = TimeTunerFlowMatchEulerDiscreteScheduler
VP_BETAS = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # the GMM testbed's betas


def _small(**kw):
    base = dict(num_samples=16, batch_size=16, num_validation_samples=8, num_heldout_samples=8, progress=False,
                guard=False)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def flow():
    return load_flow_gmm_model()


@pytest.fixture(scope="module")
def vp():
    return load_gmm_model()


def _velocity(model):
    return lambda x, t, c: model(x, t).sample


def _not_identity(rep):
    return max(abs(a - b) for a, b in zip(rep.taus, rep.grid)) > 1e-3


def _reload_and_sample(result, model, n, tmp_path, **set_kwargs):
    result.scheduler.save_pretrained(tmp_path)
    back = type(result.scheduler).from_pretrained(tmp_path)
    back.set_timesteps(n, **set_kwargs) if "sigmas" not in set_kwargs else back.set_timesteps(**set_kwargs)
    assert back.is_tuned
    torch.testing.assert_close(back.timesteps.double(), torch.tensor(result.reports[n].taus, dtype=torch.float64),
                               rtol=0, atol=1e-3)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = sample(_velocity(model), back, noise)  # keeps the timesteps just set (sigmas / mu included)
    assert torch.isfinite(x).all()
    return back


# ------------------------------------------------------------------------------------------------ conversions
def test_flow_conversions_are_exact():
    # x_s = (1 - s) x_0 + s eps and v = eps - x_0: to_epsilon must return eps exactly (float rounding only)
    sched = FLOW()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    for t in (1000.0, 731.5, 250.0, 3.0):
        s = t / 1000
        x = (1 - s) * x0 + s * eps
        torch.testing.assert_close(to_epsilon(eps - x0, x, t, sched), eps, rtol=0, atol=1e-5)
        alpha, sigma = alpha_sigma_at(sched, t)
        assert float(alpha) == pytest.approx(1 - s) and float(sigma) == pytest.approx(s)


def test_names_resolve_to_the_new_classes():
    assert scheduler_class("flow_euler") is FLOW
    assert scheduler_class("FlowMatchEulerDiscreteScheduler") is FLOW
    assert scheduler_class("unipc") is TimeTunerUniPCMultistepScheduler
    assert scheduler_class("UniPCMultistepScheduler") is TimeTunerUniPCMultistepScheduler
    assert scheduler_class("heun") is TimeTunerHeunDiscreteScheduler
    assert scheduler_class("cm").__name__ == "TimeTunerCMStochasticIterativeScheduler"
    assert scheduler_class("CMStochasticIterativeScheduler").__name__ == "TimeTunerCMStochasticIterativeScheduler"


# ------------------------------------------------------------------------------------------------ flow matching
@pytest.mark.parametrize("objective", ["teacher_local", "endpoint", "paper"])
def test_flow_euler_calibrates_reloads_and_samples(flow, objective, tmp_path):
    res = calibrate(flow, FLOW(shift=3.0), 4, objective=objective, **_small())
    rep = res.reports[4]
    assert _not_identity(rep)
    info = res.scheduler.config.tuning_info["4"]
    assert info["time_shift"] == {"use_dynamic_shifting": False, "shift": 3.0}
    assert max(rep.taus) <= 1000.0 and min(rep.taus) >= 0.0  # flow timesteps: s * 1000, s in [0, 1]
    _reload_and_sample(res, flow, 4, tmp_path)
    with pytest.raises(ValueError, match="shift=3.0"):
        FLOW.from_pretrained(tmp_path, shift=1.0)


def test_flow_paper_x0_uses_the_data(flow):
    data = flow.sample_data(64, torch.Generator().manual_seed(1))
    res = calibrate(flow, "flow_euler", 4, objective="paper_x0", data=data, **_small())
    assert _not_identity(res.reports[4])


def test_flow_dynamic_shift_records_mu(flow, tmp_path):
    res = calibrate(flow, FLOW(use_dynamic_shifting=True), 4, mu=0.8, **_small())
    assert res.scheduler.config.tuning_info["4"]["time_shift"] == {"use_dynamic_shifting": True, "mu": 0.8}
    assert _not_identity(res.reports[4])
    back = _reload_and_sample(res, flow, 4, tmp_path, mu=0.8)
    with pytest.raises(ValueError, match="mu=0.8"):
        back.set_timesteps(4, mu=1.1)


def test_flow_custom_sigmas(flow, tmp_path):
    sigmas = [1.0, 0.75, 0.45, 0.15]
    res = calibrate(flow, FLOW(shift=2.0), sigmas=sigmas, objective="endpoint", **_small())
    rep = res.reports[4]
    probe = FLOW(shift=2.0)
    probe.set_timesteps(sigmas=sigmas)
    assert rep.grid == pytest.approx(probe.timesteps.tolist())  # the shifted custom grid, not the default one
    assert res.settings["sigmas"] == sigmas
    assert _not_identity(rep)
    _reload_and_sample(res, flow, 4, tmp_path, sigmas=sigmas)


def test_flow_with_classifier_free_guidance():
    # a class-conditional UNet read as a velocity network (timestep = s * 1000); labels 0, 1 + null class 2
    unet = tiny_unet(num_class_embeds=3)
    res = calibrate(unet, "flow_euler", 3, guidance_scale=2.0, conditions=[0, 1], teacher_steps=12, **_small(
        num_samples=4, batch_size=4, num_validation_samples=2, num_heldout_samples=2))
    info = res.scheduler.config.tuning_info["3"]
    assert info["guidance_scale"] == 2.0 and info["conditioning"]["null_class_label"] == 2
    assert res.reports[3].forward_samples % 2 == 0  # CFG: two samples per network call
    assert _not_identity(res.reports[3])


def test_flow_teacher_passes_through_the_coarse_grid(flow):
    from diffusers_timetuner.calibration.objectives import Teacher

    sched = FLOW(shift=3.0)
    sched.set_timesteps(5)
    coarse = sched.timesteps.tolist()
    teacher = Teacher(lambda x, t, c: flow(x, t).sample, FLOW(shift=3.0), 25, coarse_grid=coarse)
    assert teacher.grid_indices(coarse) == [0, 5, 10, 15, 20]  # 5 equal sigma sub-steps per coarse step


def test_flow_wrong_inputs_are_refused(flow, vp):
    with pytest.raises(ValueError, match="pass the `mu`"):
        calibrate(flow, FLOW(use_dynamic_shifting=True), 4, **_small())
    with pytest.raises(ValueError, match="only applies with use_dynamic_shifting"):
        calibrate(flow, FLOW(), 4, mu=0.5, **_small())
    with pytest.raises(ValueError, match="strictly descending"):
        calibrate(flow, FLOW(), sigmas=[1.0, 0.5, 0.7], **_small())
    with pytest.raises(ValueError, match="not both"):
        calibrate(flow, FLOW(), sigmas=[1.0, 0.5], timesteps=[900, 500], **_small())
    with pytest.raises(ValueError, match="disagrees"):
        calibrate(flow, FLOW(), 5, sigmas=[1.0, 0.5], **_small())
    with pytest.raises(ValueError, match="flow-matching schedulers"):
        calibrate(vp, "ddim", sigmas=[1.0, 0.5], **_small())


# ------------------------------------------------------------------------------------------------ UniPC
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_calibrates_reloads_and_samples(vp, solver_type, order, tmp_path):
    sched = TimeTunerUniPCMultistepScheduler(solver_type=solver_type, solver_order=order,
                                             final_sigmas_type="sigma_min", **VP_BETAS)
    res = calibrate(vp, sched, 5, **_small())
    assert _not_identity(res.reports[5]) and len(res.reports[5].taus) == 5  # one tau per evaluation
    _reload_and_sample(res, vp, 5, tmp_path)


def test_unipc_bh1_with_a_final_sigma_of_zero_is_refused(vp):
    sched = TimeTunerUniPCMultistepScheduler(solver_type="bh1", **VP_BETAS)  # final_sigmas_type="zero"
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'"):
        calibrate(vp, sched, 5, **_small())


def test_unipc_with_guidance():
    unet = tiny_unet(num_class_embeds=3)
    res = calibrate(unet, "unipc", 3, guidance_scale=3.0, conditions=[0, 1], teacher_steps=15, **_small(
        num_samples=4, batch_size=4, num_validation_samples=2, num_heldout_samples=2))
    assert res.scheduler.config.tuning_info["3"]["guidance_scale"] == 3.0
    assert type(res.scheduler) is TimeTunerUniPCMultistepScheduler


# ------------------------------------------------------------------------------------------------ Heun
@pytest.mark.parametrize("objective", ["teacher_local", "endpoint"])
def test_heun_tunes_one_tau_per_evaluation(vp, objective, tmp_path):
    res = calibrate(vp, TimeTunerHeunDiscreteScheduler(**VP_BETAS), 4, objective=objective, **_small())
    rep = res.reports[4]
    assert len(rep.taus) == 2 * 4 - 1 and len(rep.grid) == 7
    assert _not_identity(rep)
    _reload_and_sample(res, vp, 4, tmp_path)


def test_heun_refuses_the_paper_objectives_and_parallel(vp):
    sched = TimeTunerHeunDiscreteScheduler(**VP_BETAS)
    with pytest.raises(ValueError, match="twice per step"):
        calibrate(vp, sched, 4, objective="paper", **_small())
    data = vp.sample_data(32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="makes two|twice per step"):
        calibrate(vp, sched, 4, objective="paper", strategy="parallel", data=data, **_small())


def test_heun_with_guidance():
    unet = tiny_unet(num_class_embeds=3)
    res = calibrate(unet, "heun", 3, guidance_scale=2.0, conditions=[0, 1], **_small(
        num_samples=4, batch_size=4, num_validation_samples=2, num_heldout_samples=2))
    assert len(res.reports[3].taus) == 5 and res.scheduler.config.tuning_info["3"]["guidance_scale"] == 2.0


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_calibrates_the_flow_testbed(tmp_path):
    from diffusers_timetuner.cli.calibrate import main, parse_args

    out = tmp_path / "run"
    args = parse_args(["--pretrained_model_name_or_path", "flow_gmm", "--scheduler", "flow_euler",
                       "--num_inference_steps", "4", "--num_samples", "8", "--batch_size", "8",
                       "--num_validation_samples", "8", "--num_heldout_samples", "8", "--no_guard",
                       "--output_dir", str(out), "--no_progress", "--cpu"])
    main(args)
    back = FLOW.from_pretrained(out)
    assert back.tuned_step_counts == [4]
    assert back.config.tuning_info["4"]["time_shift"]["shift"] == 1.0


# ------------------------------------------------------------------------------------------------ consistency models
@pytest.mark.parametrize("n", [1, 2])
def test_cm_calibrates_reloads_and_samples_at_one_and_two_steps(n, tmp_path):
    from diffusers_timetuner import TimeTunerCMStochasticIterativeScheduler

    unet = tiny_unet()  # a random UNet read as a consistency model (timestep = 250 log sigma)
    res = calibrate(unet, "cm", n, objective="endpoint", teacher_steps=2 * n, **_small(num_samples=8, batch_size=8))
    rep = res.reports[n]
    assert _not_identity(rep) and len(rep.taus) == n
    # one step ends without re-noising (deterministic: endpoint MSE); two steps re-noise (energy distance)
    assert rep.heldout["metric"] == ("endpoint_mse" if n == 1 else "energy_distance")
    res.scheduler.save_pretrained(tmp_path)
    back = TimeTunerCMStochasticIterativeScheduler.from_pretrained(tmp_path)
    back.set_timesteps(n)
    assert back.timesteps.tolist() == pytest.approx(rep.taus)
    x = sample(lambda x, t, c: unet(x, t).sample, back, torch.randn(2, 1, 8, 8), None,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_cm_with_guidance_and_the_paper_objective_refused():
    unet = tiny_unet(num_class_embeds=3)
    res = calibrate(unet, "cm", 2, guidance_scale=2.0, conditions=[0, 1], **_small(
        num_samples=4, batch_size=4, num_validation_samples=4, num_heldout_samples=4))
    assert res.scheduler.config.tuning_info["2"]["guidance_scale"] == 2.0
    with pytest.raises(ValueError, match="boundary scalings"):
        calibrate(unet, "cm", 2, objective="paper", conditions=[0, 1], **_small())


# ------------------------------------------------------------------------------------------------ the step path
@pytest.mark.parametrize("kind", ["flow_euler", "flow_euler_mu", "unipc_flow", "heun"])
def test_rollout_states_equal_sampling_with_the_tuned_scheduler(flow, vp, kind):
    # The calibration's cached step (network fed tau, solver told its grid time) must be exactly the step the tuned
    # scheduler takes in sample(): same final state for a table that differs from the grid at every evaluation.
    from diffusers_timetuner.calibration.rollout import Rollout
    from diffusers_timetuner.denoiser import Denoiser

    mu = None
    if kind == "flow_euler":
        model, sched = flow, FLOW(shift=3.0)
    elif kind == "flow_euler_mu":
        model, sched, mu = flow, FLOW(use_dynamic_shifting=True), 0.7
    elif kind == "unipc_flow":
        model, sched = flow, TimeTunerUniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                              solver_order=2)
    else:
        model, sched = vp, TimeTunerHeunDiscreteScheduler(**VP_BETAS)
    den = Denoiser(model)
    roll = Rollout(den, sched, 4, mu=mu)
    grid = roll.grid_list
    # off the grid everywhere, distinct (Heun repeats grid times), inside the range
    taus = [t - 1.5 - 0.1 * j if t > 2 else t + 0.3 + 0.1 * j for j, t in enumerate(grid)]
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cached = roll.run(roll.initial_state(roll.noise_to_state(noise)), taus).x
    tuned = sched.with_tuned_timesteps(4, taus, grid=grid)
    tuned.set_timesteps(4, **({"mu": mu} if mu is not None else {}))
    assert torch.equal(sample(den, tuned, noise), cached)
