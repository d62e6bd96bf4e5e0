"""TimeTuner schedulers against their Diffusers parents: exactness, the tau/grid split, validation, lookups.

Every sampling loop uses a tiny deterministic fake network whose output depends on the timestep it is given, so a
wrong timestep or a wrong grid changes the result. "Bit-for-bit" comparisons use `torch.equal`.
"""
import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
)

from diffusers_timetuner.schedulers import (
    TimeTunerDDIMScheduler,
    TimeTunerDDPMScheduler,
    TimeTunerDPMSolverScheduler,
    TimeTunerDPMSolverSinglestepScheduler,
    TimeTunerEulerDiscreteScheduler,
)
from diffusers_timetuner.schedulers.mixin import find_timestep_index

PAIRS = {
    "ddim": (TimeTunerDDIMScheduler, DDIMScheduler),
    "ddpm": (TimeTunerDDPMScheduler, DDPMScheduler),
    "dpm": (TimeTunerDPMSolverScheduler, DPMSolverMultistepScheduler),
    "dpm_single": (TimeTunerDPMSolverSinglestepScheduler, DPMSolverSinglestepScheduler),
    "euler": (TimeTunerEulerDiscreteScheduler, EulerDiscreteScheduler),
}
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def fake_model(x, t):
    """Deterministic stand-in for a noise network; its output depends smoothly on the (float) timestep."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.3 * x * torch.cos(t / 300.0) + 0.1 * torch.sin(t / 70.0 + x)


def t_free_model(x, t):
    """A network that ignores its timestep: any tau table must then give exactly the untuned result."""
    return 0.3 * x + 0.1 * torch.sin(x)


def sample(sched, n, *, model=fake_model, step_kwargs=None, spy=None, seed=0, shape=(2, 3, 4, 4), device=None):
    """A plain Diffusers sampling loop (as in the pipelines); `spy` collects the timesteps the model received."""
    sched.set_timesteps(n, device=device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device) * sched.init_noise_sigma
    kwargs = dict(step_kwargs or {})
    if "generator" in inspect.signature(sched.step).parameters:
        kwargs["generator"] = torch.Generator().manual_seed(seed + 1)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        if spy is not None:
            spy.append(t.clone())
        x = sched.step(model(x_in, t), t, x, **kwargs).prev_sample
    return x


def configs():
    """(name, config, step_kwargs, n) for every spacing / prediction type / solver order of the five classes."""
    out = []
    for spacing in SPACINGS:
        for pred in PREDICTIONS:
            for eta in (0.0, 0.6):
                out.append(("ddim", dict(timestep_spacing=spacing, prediction_type=pred), dict(eta=eta), 7))
            out.append(("ddpm", dict(timestep_spacing=spacing, prediction_type=pred), {}, 7))
            out.append(("euler", dict(timestep_spacing=spacing, prediction_type=pred), {}, 7))
            for order in (1, 2, 3):
                out.append(("dpm", dict(timestep_spacing=spacing, prediction_type=pred, solver_order=order), {}, 7))
    for pred in PREDICTIONS:
        for order in (1, 2, 3):
            out.append(("dpm_single", dict(prediction_type=pred, solver_order=order), {}, 7))
    out.append(("dpm", dict(algorithm_type="sde-dpmsolver++", solver_order=2), {}, 7))
    out.append(("dpm", dict(use_karras_sigmas=True, solver_order=3), {}, 7))
    out.append(("dpm_single", dict(use_karras_sigmas=True, solver_order=2), {}, 7))
    out.append(("euler", dict(use_karras_sigmas=True), {}, 7))
    out.append(("ddim", dict(beta_schedule="scaled_linear", steps_offset=1, clip_sample=False), {}, 10))
    return out


CONFIGS = configs()
IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}-{c[2]}" for c in CONFIGS]


@pytest.mark.parametrize("empty", [None, {}])
@pytest.mark.parametrize("name,config,step_kwargs,n", CONFIGS, ids=IDS)
def test_empty_table_is_the_parent_bit_for_bit(name, config, step_kwargs, n, empty):
    ours_cls, parent_cls = PAIRS[name]
    ours, parent = ours_cls(**config, tuned_timesteps=empty), parent_cls(**config)
    out_ours = sample(ours, n, step_kwargs=step_kwargs)
    out_parent = sample(parent, n, step_kwargs=step_kwargs)
    assert torch.equal(ours.timesteps, parent.timesteps) and ours.timesteps.dtype == parent.timesteps.dtype
    assert torch.equal(ours.grid_timesteps, parent.timesteps) and not ours.is_tuned
    assert torch.equal(out_ours, out_parent)


def _identity_cases():
    """Configs where the parent's own arithmetic stays on its grid (for DDIM: leading, or n dividing T)."""
    out = [c for c in CONFIGS if c[0] != "ddim"]
    for pred in PREDICTIONS:
        for eta in (0.0, 0.6):
            out.append(("ddim", dict(timestep_spacing="leading", prediction_type=pred), dict(eta=eta), 7))
            out.append(("ddim", dict(timestep_spacing="trailing", prediction_type=pred), dict(eta=eta), 10))
    return out


IDENTITY = _identity_cases()


@pytest.mark.parametrize(
    "name,config,step_kwargs,n", IDENTITY, ids=[f"{c[0]}-{sorted(c[1].items())}-{c[2]}-{c[3]}" for c in IDENTITY]
)
def test_identity_table_is_the_parent_bit_for_bit(name, config, step_kwargs, n):
    ours_cls, parent_cls = PAIRS[name]
    parent = parent_cls(**config)
    parent.set_timesteps(n)
    grid = parent.timesteps.tolist()
    ours = ours_cls(**config, tuned_timesteps={n: grid}, tuned_grids={n: grid})
    spy = []
    out_ours = sample(ours, n, step_kwargs=step_kwargs, spy=spy)
    out_parent = sample(parent_cls(**config), n, step_kwargs=step_kwargs)
    assert ours.is_tuned and ours.timesteps.dtype == torch.float32
    assert torch.equal(torch.stack(spy), torch.tensor(grid, dtype=torch.float32))
    assert torch.equal(out_ours, out_parent)


def _ddim_step(x, eps, a_t, a_prev):
    """DDIM eq. 12 with eta = 0, written out: x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps."""
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def test_ddim_identity_table_is_the_parent_where_the_parent_leaves_its_grid():
    # trailing spacing, n = 7 does not divide T = 1000; linspace spacing. TimeTuner keeps the parent's update rule
    # x_{t_i} -> x_{t_i - T // n} (off its own grid there): an identity table samples exactly like the parent.
    parent = DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    parent.set_timesteps(7)
    grid = parent.timesteps.tolist()
    # round(arange(1000, 0, -1000 / 7)) - 1 = round(1000, 857.14, 714.29, 571.43, 428.57, 285.71, 142.86) - 1
    assert grid == [999, 856, 713, 570, 428, 285, 142]
    ours = TimeTunerDDIMScheduler(timestep_spacing="trailing", clip_sample=False, tuned_timesteps={7: grid})
    ours.set_timesteps(7)
    x, eps = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    ac = parent.alphas_cumprod
    # Both step 999 -> 999 - 1000 // 7 = 857 (not the next grid time 856) ...
    out_parent = parent.step(eps, parent.timesteps[0], x).prev_sample
    out_ours = ours.step(eps, ours.timesteps[0], x).prev_sample
    torch.testing.assert_close(out_parent, _ddim_step(x, eps, ac[999], ac[857]), rtol=1e-6, atol=1e-6)
    assert torch.equal(out_parent, out_ours)
    # ... and land on alphas_cumprod[142 - 142 = 0] at the last step (not final_alpha_cumprod).
    out_parent = parent.step(eps, parent.timesteps[-1], x).prev_sample
    out_ours = ours.step(eps, ours.timesteps[-1], x).prev_sample
    torch.testing.assert_close(out_parent, _ddim_step(x, eps, ac[142], ac[0]), rtol=1e-6, atol=1e-6)
    assert torch.equal(out_parent, out_ours)
    # Over full loops, trailing n = 7 and linspace n = 10 (grid 999, 888, ..., parent 999 -> 899): bit-identical.
    assert torch.equal(
        sample(TimeTunerDDIMScheduler(timestep_spacing="trailing", tuned_timesteps={7: grid}), 7),
        sample(DDIMScheduler(timestep_spacing="trailing"), 7),
    )
    linspace = DDIMScheduler(timestep_spacing="linspace")
    linspace.set_timesteps(10)
    assert linspace.timesteps.tolist()[:2] == [999, 888]
    assert torch.equal(
        sample(TimeTunerDDIMScheduler(timestep_spacing="linspace", tuned_timesteps={10: linspace.timesteps.tolist()}),
               10),
        sample(DDIMScheduler(timestep_spacing="linspace"), 10),
    )
    # A custom grid (no parent rule) steps to the next grid time: 999 -> 856.
    custom = TimeTunerDDIMScheduler(clip_sample=False, tuned_timesteps={7: grid}, tuned_grids={7: grid})
    custom.set_timesteps(timesteps=grid)
    out_custom = custom.step(eps, custom.timesteps[0], x).prev_sample
    torch.testing.assert_close(out_custom, _ddim_step(x, eps, ac[999], ac[856]), rtol=1e-6, atol=1e-6)


TAUS4 = [760.25, 505.5, 245.75, 3.5]  # arbitrary taus near the leading grid 750, 500, 250, 0 (n = 4)


def test_tuned_ddim_feeds_taus_and_steps_on_the_grid():
    sched = TimeTunerDDIMScheduler(clip_sample=False, tuned_timesteps={"4": TAUS4})
    sched.set_timesteps(4)
    assert sched.grid_timesteps.tolist() == [750, 500, 250, 0]  # leading: k * (1000 // 4), descending
    assert torch.equal(sched.timesteps, torch.tensor(TAUS4, dtype=torch.float32))
    # One step by hand with the grid's alpha-bars (t_i = 750 -> t_{i-1} = 500), the model output at tau = 760.25.
    x = torch.randn(1, 2, 3, 3)
    eps = fake_model(x, sched.timesteps[0])
    ac = sched.alphas_cumprod
    out = sched.step(eps, sched.timesteps[0], x).prev_sample
    torch.testing.assert_close(out, _ddim_step(x, eps, ac[750], ac[500]), rtol=1e-6, atol=1e-6)
    # Full loop: the model sees exactly the taus, and the result differs from the untuned sampler.
    spy = []
    tuned = sample(sched, 4, spy=spy)
    assert torch.equal(torch.stack(spy), torch.tensor(TAUS4, dtype=torch.float32))
    assert not torch.equal(tuned, sample(DDIMScheduler(clip_sample=False), 4))


@pytest.mark.parametrize("name", list(PAIRS))
def test_solver_ignores_tau_apart_from_the_network(name):
    """With a network that ignores t, any table gives exactly the untuned result: the update reads only the grid."""
    ours_cls, parent_cls = PAIRS[name]
    parent = parent_cls()
    parent.set_timesteps(4)
    taus = [t + 3.25 if t < 990 else t - 3.25 for t in parent.timesteps.tolist()]  # stay inside [0, 999]
    for order in ((1, 2, 3) if name.startswith("dpm") else (None,)):
        cfg = {} if order is None else {"solver_order": order}
        spy = []
        tuned = sample(ours_cls(**cfg, tuned_timesteps={4: taus}), 4, model=t_free_model, spy=spy)
        assert torch.equal(torch.stack(spy), torch.tensor(taus, dtype=torch.float32))
        assert torch.equal(tuned, sample(parent_cls(**cfg), 4, model=t_free_model))
        # ... and with the t-dependent network the table does change the output.
        assert not torch.equal(
            sample(ours_cls(**cfg, tuned_timesteps={4: taus}), 4), sample(parent_cls(**cfg), 4)
        )


# ---- set_timesteps validation --------------------------------------------------------------------------------
def test_grid_mismatch_names_both_grids():
    sched = TimeTunerDDIMScheduler(
        timestep_spacing="trailing", tuned_timesteps={4: TAUS4}, tuned_grids={4: [750, 500, 250, 0]}
    )
    match = r"tuned on the grid \[750, 500, 250, 0\].*produces the grid \[999, 749, 499, 249\]"
    before = dict(sched.__dict__)
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(4)
    # The failed call left no half-set state: the very same attribute objects as before.
    assert sched.__dict__.keys() == before.keys() and all(sched.__dict__[k] is v for k, v in before.items())
    # The recorded grid of the config it was tuned with passes.
    ok = TimeTunerDDIMScheduler(tuned_timesteps={4: TAUS4}, tuned_grids={4: [750, 500, 250, 0]})
    ok.set_timesteps(4)
    assert ok.is_tuned


@pytest.mark.parametrize("name", list(PAIRS))
def test_missing_step_count_lists_the_available_ones(name):
    sched = PAIRS[name][0](tuned_timesteps={4: [900.5, 600.5, 300.5, 10.5], 2: [800.5, 300.5]})
    before = sched.timesteps.clone()
    match = r"num_inference_steps \[2, 4\], not for 10.*calibrate\.py --num_inference_steps 10"
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(10)
    assert torch.equal(sched.timesteps, before)  # raised before touching the state


def test_table_without_recorded_grid_via_from_config():
    plain = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    taus = [905.5, 805.5, 705.5, 605.5, 505.5, 405.5, 305.5, 205.5, 105.5, 5.5]
    sched = TimeTunerDDIMScheduler.from_config(plain.config, tuned_timesteps={"10": taus})
    assert sched.config.beta_schedule == "scaled_linear" and torch.equal(sched.betas, plain.betas)
    sched.set_timesteps(10)
    plain.set_timesteps(10)
    assert torch.equal(sched.grid_timesteps, plain.timesteps)  # the grid this config produces (901, 801, ..., 1)
    assert torch.equal(sched.timesteps, torch.tensor(taus, dtype=torch.float32))


def test_with_tuned_timesteps_returns_a_new_scheduler():
    base = TimeTunerDPMSolverScheduler(
        beta_schedule="scaled_linear", solver_order=3, tuned_timesteps={2: [900.5, 400.5]}
    )
    new = base.with_tuned_timesteps(4, torch.tensor(TAUS4), grid=[999, 749, 500, 250], info={"objective": "paper"})
    assert type(new) is TimeTunerDPMSolverScheduler and new is not base
    assert new.config.tuned_timesteps == {"2": [900.5, 400.5], "4": TAUS4}
    assert new.config.tuned_grids == {"4": [999, 749, 500, 250]}
    info = dict(new.config.tuning_info["4"])
    made_for = info.pop("made_for")  # what the table was made for, recorded by with_tuned_timesteps
    assert info == {"objective": "paper"}
    assert made_for["class_name"] == "TimeTunerDPMSolverScheduler" and made_for["beta_schedule"] == "scaled_linear"
    assert made_for["prediction_type"] == "epsilon" and made_for["num_train_timesteps"] == 1000
    assert base.config.tuned_timesteps == {"2": [900.5, 400.5]}  # the original is untouched
    keys = set(base.config) - {"tuned_timesteps", "tuned_grids", "tuning_info", "_use_default_values"}
    assert all(new.config[k] == base.config[k] for k in keys)
    new.set_timesteps(4)
    assert torch.equal(new.timesteps, torch.tensor(TAUS4, dtype=torch.float32))
    # Replacing a table without a grid drops the recorded grid for that n.
    assert new.with_tuned_timesteps(4, TAUS4).config.tuned_grids is None


def test_euler_continuous_timesteps_refuse_a_table():
    with pytest.raises(ValueError, match="timestep_type='continuous'"):
        TimeTunerEulerDiscreteScheduler(
            timestep_type="continuous", prediction_type="v_prediction", tuned_timesteps={2: [1.0, 0.5]}
        )


# ---- lookups and the methods pipelines call with timesteps ---------------------------------------------------
@pytest.mark.parametrize("name", list(PAIRS))
def test_index_for_timestep_is_tolerant_and_strict(name):
    sched = PAIRS[name][0](tuned_timesteps={4: TAUS4})
    sched.set_timesteps(4)
    for i, tau in enumerate(TAUS4):
        assert sched.index_for_timestep(sched.timesteps[i]) == i
        assert sched.index_for_timestep(torch.tensor(tau, dtype=torch.float64)) == i  # float64 vs float32
        assert sched.index_for_timestep(tau) == i
    for i, t in enumerate(sched.grid_timesteps.tolist()):  # integer timesteps keep the parent's (grid) meaning
        if float(t).is_integer():
            assert sched.index_for_timestep(torch.tensor(int(t))) == i
    with pytest.raises(ValueError, match="is not one of scheduler.timesteps"):
        sched.index_for_timestep(torch.tensor(505.6))
    with pytest.raises(ValueError, match="ambiguous"):
        find_timestep_index(torch.tensor([5.0, 7.0, 5.0]), 5.0)


def test_dpm_no_silent_fallback_and_order_check():
    parent = DPMSolverMultistepScheduler()
    parent.set_timesteps(4)
    assert parent.index_for_timestep(torch.tensor(123)) == 3  # the parent silently takes the last index
    sched = TimeTunerDPMSolverScheduler(tuned_timesteps={4: TAUS4})
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="is not one of"):
        sched.index_for_timestep(torch.tensor(123.0))
    x = torch.randn(1, 2, 3, 3)
    x = sched.step(fake_model(x, sched.timesteps[0]), sched.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="of step 2, but the scheduler is at step 1"):
        sched.step(fake_model(x, sched.timesteps[2]), sched.timesteps[2], x)


def _outcome(fn):
    try:
        return ("index", fn())
    except ValueError as err:
        return ("error", str(err))


def _tricky_schedules():
    """Schedules for the prepared lookup: distinct, near-duplicate (inside / just outside the tolerance, which at 500
    is 1e-5 + 1e-6 * 500 = 5.1e-4 by table.TAU_ATOL / TAU_RTOL), exact duplicates, one entry, empty, a NaN entry."""
    return [
        torch.tensor(TAUS4),
        torch.tensor([999.0, 899.5, 500.0, 500.0004, 3.0]),
        torch.tensor([999.0, 500.0, 500.0006, 0.0], dtype=torch.float64),
        torch.tensor([5.0, 7.0, 5.0]),
        torch.tensor([0.0, -0.0, 1e-6]),
        torch.tensor([42.0]),
        torch.tensor([], dtype=torch.float32),
        torch.tensor([3.0, float("nan"), 1.0]),
    ]


@pytest.mark.parametrize("schedule", _tricky_schedules(), ids=lambda s: str(s.tolist()))
def test_prepared_lookup_agrees_with_find_timestep_index(schedule):
    """The scheduler's cached per-schedule lookup must return the same index, or raise the same error, as the plain
    scan `find_timestep_index` for exact entries, float64 neighbours at and around the tolerance, NaN and inf."""
    sched = TimeTunerDDIMScheduler(tuned_timesteps={4: TAUS4})
    sched.set_timesteps(4)
    queries = [float("nan"), float("inf"), 123.456]
    for v in schedule.tolist():
        tol = 1e-5 + 1e-6 * abs(v)  # table.TAU_ATOL + TAU_RTOL * |v|
        queries += [v] + [v + f * tol for f in (-1.001, -0.999, -0.5, 0.5, 0.999, 1.001, 2.5)]
    for q in queries:
        for t in (q, torch.tensor(q), torch.tensor(q, dtype=torch.float64)):
            want = _outcome(lambda: find_timestep_index(schedule, t, what="scheduler.timesteps (tuned taus)"))
            got = _outcome(lambda: sched.index_for_timestep(t, schedule_timesteps=schedule))
            assert got == want, (schedule.tolist(), q)


def test_prepared_lookup_follows_changes_of_the_timesteps():
    """The cache is keyed by the tensor: in-place edits, reassignment and inference-mode tensors take effect."""
    sched = TimeTunerDDIMScheduler(tuned_timesteps={4: TAUS4})
    sched.set_timesteps(4)
    assert sched.index_for_timestep(760.25) == 0
    sched.timesteps[0] = 900.5  # in place
    assert sched.index_for_timestep(900.5) == 0
    with pytest.raises(ValueError, match="is not one of"):
        sched.index_for_timestep(760.25)
    sched.timesteps = sched.timesteps.flip(0)  # a new tensor
    assert sched.index_for_timestep(900.5) == 3
    with torch.inference_mode():  # inference tensors have no version counter
        sched.set_timesteps(4)
        assert sched.index_for_timestep(505.5) == 1
        sched.timesteps[1] = 600.5
        assert sched.index_for_timestep(600.5) == 1
        with pytest.raises(ValueError, match="is not one of"):
            sched.index_for_timestep(505.5)


def test_ddim_tuned_step_follows_an_edited_grid():
    """DDIM reads the grid as prepared Python ints: an in-place edit of `grid_timesteps` must still be seen."""
    x, eps = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    edited = TimeTunerDDIMScheduler(clip_sample=False, tuned_timesteps={4: TAUS4})
    edited.set_timesteps(4)
    edited.step(eps, edited.timesteps[0], x)  # prepares the grid 750, 500, 250, 0
    edited.grid_timesteps[0] = 700  # t_i of step 0; the parent's rule then steps to 700 - 1000 // 4 = 450
    got = edited.step(eps, edited.timesteps[0], x).prev_sample
    a_t, a_prev = edited.alphas_cumprod[700], edited.alphas_cumprod[450]
    assert torch.allclose(got, _ddim_step(x, eps, a_t, a_prev), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(PAIRS))
def test_add_noise_uses_the_grid_noise_level(name):
    ours_cls, parent_cls = PAIRS[name]
    ours, parent = ours_cls(tuned_timesteps={4: TAUS4}), parent_cls()
    ours.set_timesteps(4)
    parent.set_timesteps(4)
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    got = ours.add_noise(x0, noise, ours.timesteps[[0, 2, 3]])
    want = parent.add_noise(x0, noise, parent.timesteps[[0, 2, 3]])
    assert torch.equal(got, want)
    # Integer timesteps keep the parent's meaning (training-time add_noise on the grid).
    if name in ("ddim", "ddpm"):
        t = torch.tensor([17, 600, 999])
        assert torch.equal(ours.add_noise(x0, noise, t), parent.add_noise(x0, noise, t))


@pytest.mark.parametrize("name", ["dpm", "dpm_single", "euler"])
def test_set_begin_index_img2img(name):
    """img2img: set_begin_index(k), add_noise at timesteps[k:k+1], then the remaining steps."""
    ours_cls, parent_cls = PAIRS[name]
    x0, noise = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    outs = []
    for sched in (ours_cls(tuned_timesteps={4: TAUS4}), parent_cls()):
        sched.set_timesteps(4)
        sched.set_begin_index(1)
        x = sched.add_noise(x0, noise, sched.timesteps[1:2])
        for t in sched.timesteps[1:]:
            x = sched.step(t_free_model(sched.scale_model_input(x, t), t), t, x).prev_sample
        outs.append(x)
    assert torch.equal(*outs)  # t-free network: the tuned solver path equals the parent's from step 1


def test_ddim_add_noise_mid_way_then_steps():
    """DDIM img2img pattern (no begin index): add_noise(timesteps[k]) starts at the grid time of step k."""
    ours = TimeTunerDDIMScheduler(tuned_timesteps={4: TAUS4})
    ours.set_timesteps(4)
    ac = ours.alphas_cumprod
    x0, noise = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    got = ours.add_noise(x0, noise, ours.timesteps[1:2])
    torch.testing.assert_close(got, ac[500] ** 0.5 * x0 + (1 - ac[500]) ** 0.5 * noise, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(PAIRS))
def test_scale_model_input_with_taus(name):
    """A sampling loop fed the taus scales the network input at every step as the parent does at the grid time:
    Euler by 1 / sqrt(sigma_i^2 + 1) with the grid's sigma_i (computed here from alphas_cumprod, not by the
    scheduler), the others not at all (their parents return the sample as it is)."""
    ours_cls, _ = PAIRS[name]
    ours = ours_cls(tuned_timesteps={4: TAUS4})
    ours.set_timesteps(4)
    assert ours.timesteps.tolist() == TAUS4  # the table reaches the loop: every call below gets a tau, not a grid t
    grid = [int(t) for t in ours.grid_timesteps.tolist()]
    assert all(abs(tau - t) > 3 for tau, t in zip(TAUS4, grid))
    ac = ours.alphas_cumprod.double()
    sigma_at = lambda t: float(np.interp(t, np.arange(len(ac)), ((1 - ac) / ac).sqrt().numpy()))  # noqa: E731
    stochastic = "generator" in inspect.signature(ours.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(1)} if stochastic else {}
    x = torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    for i, tau in enumerate(ours.timesteps):
        got = ours.scale_model_input(x, tau)
        if name == "euler":
            expected = x / (sigma_at(grid[i]) ** 2 + 1) ** 0.5
            # scaling with the sigma at tau instead would be caught: it differs by > 4e-4 relative at every step
            assert not torch.allclose(expected, x / (sigma_at(float(tau)) ** 2 + 1) ** 0.5, rtol=1e-4, atol=0)
        else:
            expected = x
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        x = ours.step(fake_model(got, tau), tau, x, **kwargs).prev_sample


def test_euler_scale_model_input_uses_the_grid_sigma_at_begin_index():
    ours = TimeTunerEulerDiscreteScheduler(tuned_timesteps={4: TAUS4})
    ours.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4)
    # Fresh scheduler: the index comes from the tau lookup (step 2), the scaling from sigmas[2].
    assert torch.equal(ours.scale_model_input(x, ours.timesteps[2]), x / (ours.sigmas[2] ** 2 + 1) ** 0.5)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_get_velocity_with_taus(name):
    ours_cls, parent_cls = PAIRS[name]
    ours, parent = ours_cls(tuned_timesteps={4: TAUS4}), parent_cls()
    ours.set_timesteps(4)
    parent.set_timesteps(4)
    x, noise = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    got = ours.get_velocity(x, noise, ours.timesteps[[1, 3]])
    assert torch.equal(got, parent.get_velocity(x, noise, parent.timesteps[[1, 3]]))


def test_euler_get_velocity_with_taus_uses_grid_sigma():
    ours = TimeTunerEulerDiscreteScheduler(tuned_timesteps={4: TAUS4})
    ours.set_timesteps(4)
    x, noise = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    a = 1 / (1 + ours.sigmas[1] ** 2)  # alpha-bar at the grid sigma of step 1
    torch.testing.assert_close(ours.get_velocity(x, noise, ours.timesteps[1:2]), a**0.5 * noise - (1 - a) ** 0.5 * x)


# ---- DDIM / DDPM grids ----------------------------------------------------------------------------------------
def test_quadratic_grid_follows_the_ddim_reference():
    # ermongroup/ddim "quad": int(linspace(0, sqrt(0.8 * 1000), 10) ** 2) = int(k^2 * 800 / 81), k = 0..9, reversed.
    expected = [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    for cls in (TimeTunerDDIMScheduler, TimeTunerDDPMScheduler):
        sched = cls(timestep_spacing="quadratic")
        sched.set_timesteps(10)
        assert sched.timesteps.tolist() == expected and sched.num_inference_steps == 10
    with pytest.raises(ValueError, match="duplicate integer timesteps"):
        TimeTunerDDIMScheduler(timestep_spacing="quadratic").set_timesteps(40)


def test_ddim_custom_grid_equal_to_leading_is_the_parent():
    parent = DDIMScheduler()
    parent.set_timesteps(7)
    sched = TimeTunerDDIMScheduler()
    sched.set_timesteps(timesteps=parent.timesteps.tolist())
    # Leading has the constant stride T // n, so walking the grid is the parent's t - T // n.
    spy = []
    out = sample_custom(sched, parent.timesteps.tolist(), spy)
    assert torch.equal(out, sample(DDIMScheduler(), 7))


def sample_custom(sched, grid, spy):
    sched.set_timesteps(timesteps=grid)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3, 4, 4), generator=g)
    for t in sched.timesteps:
        spy.append(t)
        x = sched.step(fake_model(x, t), t, x).prev_sample
    return x


def test_ddim_quadratic_grid_with_a_table():
    taus = [805.5, 640.0, 480.25, 350.0, 250.0, 160.0, 90.0, 40.0, 10.0, 1.0]
    grid = [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    sched = TimeTunerDDIMScheduler(
        timestep_spacing="quadratic", clip_sample=False, tuned_timesteps={10: taus}, tuned_grids={10: grid}
    )
    spy = []
    sample(sched, 10, spy=spy)
    assert torch.equal(torch.stack(spy), torch.tensor(taus, dtype=torch.float32))
    x = torch.randn(1, 2, 3, 3)
    ac = sched.alphas_cumprod
    out = sched.step(fake_model(x, sched.timesteps[3]), sched.timesteps[3], x).prev_sample  # 355 -> 246
    want = _ddim_step(x, fake_model(x, sched.timesteps[3]), ac[355], ac[246])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(timesteps=[500, 600]), "strictly descending"),
        (dict(timesteps=[1000, 500]), r"must lie in \[0, 999\]"),
        (dict(timesteps=[500, -1]), r"must lie in \[0, 999\]"),
        (dict(timesteps=[500.5, 100]), "is not an integer"),
        (dict(timesteps=[]), "is empty"),
        (dict(num_inference_steps=4, timesteps=[500, 100]), "exactly one"),
        (dict(), "exactly one"),
    ],
)
def test_ddim_custom_grid_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimeTunerDDIMScheduler().set_timesteps(**kwargs)


def test_ddpm_tuned_previous_timestep_walks_the_grid():
    sched = TimeTunerDDPMScheduler(tuned_timesteps={4: TAUS4})
    sched.set_timesteps(4)
    assert [int(sched.previous_timestep(t)) for t in sched.timesteps] == [500, 250, 0, -1]
    assert [int(sched.previous_timestep(t)) for t in sched.grid_timesteps] == [500, 250, 0, -1]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")


@CUDA
@pytest.mark.parametrize("name", list(PAIRS))
def test_on_cuda(name):
    """Device placement: taus and grid on the pipeline's device, lookups and add_noise work, identity == parent."""
    ours_cls, parent_cls = PAIRS[name]
    parent = parent_cls()
    parent.set_timesteps(4, device="cuda")
    grid = parent.timesteps.tolist()
    ours = ours_cls(tuned_timesteps={4: TAUS4})
    spy = []
    out = sample(ours, 4, spy=spy, device="cuda")
    assert ours.timesteps.device.type == "cuda" and ours.grid_timesteps.device.type == "cuda" and out.is_cuda
    assert torch.equal(torch.stack(spy).cpu(), torch.tensor(TAUS4))
    ours.set_timesteps(4, device="cuda")  # fresh state: add_noise before the first step (no step index yet)
    x0 = torch.randn(2, 2, 4, 4, device="cuda")
    got = ours.add_noise(x0, x0.flip(0), ours.timesteps[[0, 2]])
    assert torch.equal(got, parent.add_noise(x0, x0.flip(0), parent.timesteps[[0, 2]]))
    identity = sample(ours_cls(tuned_timesteps={4: grid}), 4, device="cuda")
    assert torch.equal(identity, sample(parent_cls(), 4, device="cuda"))


@pytest.mark.parametrize("name", list(PAIRS))
def test_shared_sampling_loop_sees_grid_and_taus(name):
    """diffusers_timetuner.sampling.sample (used by calibration): callback t = grid t_i, tau = what the net saw."""
    from diffusers_timetuner.denoiser import Denoiser
    from diffusers_timetuner.sampling import sample as shared_sample

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return fake_model(x, t.reshape(-1, 1, 1, 1))

    ours_cls, parent_cls = PAIRS[name]
    sched = ours_cls(tuned_timesteps={4: TAUS4})
    seen = []
    noise = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    out = shared_sample(Denoiser(Net()), sched, noise, 4, generator=torch.Generator().manual_seed(1),
                        callback=lambda info: seen.append((info["t"], info["tau"])))
    assert torch.equal(torch.stack([t for t, _ in seen]), sched.grid_timesteps)
    assert torch.equal(torch.stack([tau for _, tau in seen]), torch.tensor(TAUS4))
    assert torch.equal(out, sample(ours_cls(tuned_timesteps={4: TAUS4}), 4, shape=(2, 3, 4, 4)))
