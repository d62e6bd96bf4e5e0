"""TimeTuner flow-matching Euler and UniPC schedulers against their Diffusers parents.

Sampling loops use a deterministic fake network whose output depends on the timestep it is given, so a wrong
timestep or grid changes the result; "bit-for-bit" means `torch.equal`.
"""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler, TimeTunerUniPCMultistepScheduler

FLOW = (TimeTunerFlowMatchEulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)
UNIPC = (TimeTunerUniPCMultistepScheduler, UniPCMultistepScheduler)


def fake_model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.3 * x * torch.cos(t / 300.0) + 0.1 * torch.sin(t / 70.0 + x)


def t_free_model(x, t):
    return 0.3 * x + 0.1 * torch.sin(x)


def sample(sched, n, *, model=fake_model, spy=None, seed=0, set_kwargs=None):
    sched.set_timesteps(n, **(set_kwargs or {}))
    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(seed)) * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        if spy is not None:
            spy.append(float(t))
        x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model(x_in, t), t, x).prev_sample
    return x


def grid_of(parent, n, **set_kwargs):
    parent.set_timesteps(n, **set_kwargs)
    return parent.timesteps.tolist()


def shifted(values, d=2.5, top=999):
    return [t + d if t + d <= top else t - d for t in values]


MU = 0.8  # an arbitrary dynamic shift (Flux computes mu from the image sequence length)
FLOW_CASES = [
    (dict(), {}),
    (dict(shift=3.0), {}),
    (dict(shift=3.0, stochastic_sampling=True), {}),
    (dict(use_dynamic_shifting=True), dict(mu=MU)),
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=MU)),
    (dict(shift=3.0, use_karras_sigmas=True), {}),
    (dict(shift=3.0, shift_terminal=0.1), {}),
    (dict(shift=3.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1, 0.05])),
]
# final_sigmas_type="sigma_min": the parent itself returns NaN with bh1 (and predict_x0=False) on a final sigma of 0.
UNIPC_CASES = [
    dict(solver_type=st, solver_order=order, prediction_type=pred, final_sigmas_type="sigma_min")
    for st in ("bh1", "bh2") for order in (1, 2, 3) for pred in ("epsilon", "v_prediction")
] + [
    dict(solver_order=2, timestep_spacing="trailing", use_karras_sigmas=True),
    dict(solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    dict(solver_order=3, predict_x0=False, final_sigmas_type="sigma_min"),
]


def _n(set_kwargs, default=6):
    return len(set_kwargs["sigmas"]) if "sigmas" in set_kwargs else default


def _seeded(fn):
    torch.manual_seed(0)
    return fn()


@pytest.mark.parametrize("config,set_kwargs", FLOW_CASES)
def test_flow_untuned_and_identity_are_the_parent(config, set_kwargs):
    n = _n(set_kwargs)
    ref = _seeded(lambda: sample(FlowMatchEulerDiscreteScheduler(**config), n, set_kwargs=set_kwargs))
    empty = _seeded(lambda: sample(FLOW[0](**config), n, set_kwargs=set_kwargs))
    grid = grid_of(FlowMatchEulerDiscreteScheduler(**config), n, **set_kwargs)
    ident = FLOW[0](**config, tuned_timesteps={n: grid}, tuned_grids={n: grid})
    same = _seeded(lambda: sample(ident, n, set_kwargs=set_kwargs))
    assert torch.equal(empty, ref) and torch.equal(same, ref) and ident.is_tuned


@pytest.mark.parametrize("config", UNIPC_CASES)
def test_unipc_untuned_and_identity_are_the_parent(config):
    n = 6
    ref = sample(UniPCMultistepScheduler(**config), n)
    assert torch.equal(sample(UNIPC[0](**config), n), ref)
    grid = grid_of(UniPCMultistepScheduler(**config), n)
    ident = UNIPC[0](**config, tuned_timesteps={n: grid}, tuned_grids={n: grid})
    assert torch.equal(sample(ident, n), ref) and ident.is_tuned


@pytest.mark.parametrize("pair,config,set_kwargs", [
    (FLOW, dict(shift=3.0), {}), (FLOW, dict(use_dynamic_shifting=True), dict(mu=MU)),
    (FLOW, dict(shift=3.0), dict(sigmas=[1.0, 0.7, 0.4, 0.1])),
    (UNIPC, dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), {}), (UNIPC, dict(solver_type="bh2"), {}),
])
def test_network_sees_the_taus_and_the_solver_stays_on_its_grid(pair, config, set_kwargs):
    cls, parent_cls = pair
    n = _n(set_kwargs, default=5)
    grid = grid_of(parent_cls(**config), n, **set_kwargs)
    taus = shifted(grid, top=1000)
    sched = cls(**config, tuned_timesteps={n: taus})
    seen = []
    tuned = sample(sched, n, spy=seen, set_kwargs=set_kwargs)
    assert seen == pytest.approx(taus, abs=1e-4)  # float32 storage of the table
    assert torch.equal(sched.grid_timesteps, torch.tensor(grid, dtype=sched.grid_timesteps.dtype))
    untuned = sample(parent_cls(**config), n, set_kwargs=set_kwargs)
    assert not torch.allclose(tuned, untuned)
    # a network that ignores its timestep: the tuned scheduler takes exactly the parent's steps
    assert torch.equal(sample(sched, n, model=t_free_model, set_kwargs=set_kwargs),
                       sample(parent_cls(**config), n, model=t_free_model, set_kwargs=set_kwargs))


@pytest.mark.parametrize("pair,config", [(FLOW, dict(shift=3.0)), (UNIPC, dict(solver_type="bh1", final_sigmas_type="sigma_min"))])
def test_round_trips_keep_parent_keys_and_table(tmp_path, pair, config):
    cls, parent_cls = pair
    n = 4
    taus = shifted(grid_of(parent_cls(**config), n), top=1000)
    info = {n: {"objective": "test"}}
    sched = cls(**config, tuned_timesteps={n: taus}, tuning_info=info)
    sched.save_pretrained(tmp_path)
    for again in (cls.from_pretrained(tmp_path), cls.from_config(sched.config)):
        assert {k for k in parent_cls(**config).config if not k.startswith("_")} <= set(again.config)
        assert again.config.tuned_timesteps == {str(n): taus} and again.config.tuning_info == {"4": {"objective": "test"}}
        again.set_timesteps(n)
        assert again.timesteps.tolist() == pytest.approx(taus, abs=1e-4)
    # the parent loads the saved config too (unknown keys ignored) and samples its own grid
    parent = parent_cls.from_pretrained(tmp_path)
    assert torch.equal(sample(parent, n), sample(parent_cls(**config), n))
    other = sched.with_tuned_timesteps(n, grid_of(parent_cls(**config), n))
    assert type(other) is cls and other.config.tuning_info is None


def test_flow_table_refuses_another_shift():
    n = 4
    grid = grid_of(FlowMatchEulerDiscreteScheduler(shift=3.0), n)
    record = TimeTunerFlowMatchEulerDiscreteScheduler(shift=3.0).time_shift_record()
    assert record == {"use_dynamic_shifting": False, "shift": 3.0}
    kw = dict(tuned_timesteps={n: shifted(grid)}, tuning_info={n: {"time_shift": record}})
    with pytest.raises(ValueError, match=r"tuned with shift=3.0, but this scheduler has shift=2.0"):
        TimeTunerFlowMatchEulerDiscreteScheduler(shift=2.0, **kw)
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=False \(shift=3.0\).*use_dynamic_shifting=True"):
        TimeTunerFlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **kw)
    sched = TimeTunerFlowMatchEulerDiscreteScheduler(shift=3.0, **kw)
    sched.set_timesteps(n)
    sched.set_shift(5.0)
    with pytest.raises(ValueError, match=r"now has shift=5.0"):
        sched.set_timesteps(n)
    assert sched.is_tuned  # the failed call left the scheduler as it was


def test_flow_table_refuses_another_mu():
    n = 4
    cfg = dict(use_dynamic_shifting=True)
    record = TimeTunerFlowMatchEulerDiscreteScheduler(**cfg).time_shift_record(mu=MU)
    grid = grid_of(FlowMatchEulerDiscreteScheduler(**cfg), n, mu=MU)
    sched = TimeTunerFlowMatchEulerDiscreteScheduler(
        **cfg, tuned_timesteps={n: shifted(grid)}, tuning_info={n: {"time_shift": record}})
    sched.set_timesteps(n, mu=MU)
    with pytest.raises(ValueError, match=r"tuned with mu=0.8 .* but set_timesteps got mu=1.1"):
        sched.set_timesteps(n, mu=1.1)
    with pytest.raises(ValueError, match="mu"):
        TimeTunerFlowMatchEulerDiscreteScheduler(**cfg).time_shift_record()
    with pytest.raises(ValueError, match="must be"):
        TimeTunerFlowMatchEulerDiscreteScheduler(
            **cfg, tuned_timesteps={n: shifted(grid)}, tuning_info={n: {"time_shift": {"mu": 1}}})


def test_flow_recorded_grid_catches_another_custom_sigmas():
    n = 4
    sig = [1.0, 0.7, 0.4, 0.1]
    grid = grid_of(FlowMatchEulerDiscreteScheduler(), n, sigmas=sig)
    sched = TimeTunerFlowMatchEulerDiscreteScheduler(tuned_timesteps={n: shifted(grid)}, tuned_grids={n: grid})
    sched.set_timesteps(sigmas=sig)
    with pytest.raises(ValueError, match="tuned on the grid"):
        sched.set_timesteps(sigmas=[1.0, 0.75, 0.4, 0.1])


@pytest.mark.parametrize("pair", [FLOW, UNIPC])
def test_wrong_step_count_and_wrong_tau_raise(pair):
    cls, parent_cls = pair
    grid = grid_of(parent_cls(), 4)
    sched = cls(tuned_timesteps={4: shifted(grid, top=1000)})
    with pytest.raises(ValueError, match=r"tau tables for num_inference_steps \[4\], not for 5"):
        sched.set_timesteps(5)
    with pytest.raises(ValueError, match="has 3 values"):
        cls(tuned_timesteps={4: grid[:3]})
    sched.set_timesteps(4)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="is not one of"):
        sched.step(x, torch.tensor(grid[1] + 40.0), x)


def test_flow_per_token_timesteps_refused_with_a_table():
    grid = grid_of(FlowMatchEulerDiscreteScheduler(), 3)
    sched = TimeTunerFlowMatchEulerDiscreteScheduler(tuned_timesteps={3: shifted(grid, top=1000)})
    sched.set_timesteps(3)
    x = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        sched.step(x, sched.timesteps[0], x, per_token_timesteps=torch.ones(1, 2))


def test_flow_scale_noise_uses_the_grid_sigma():
    n = 4
    grid = grid_of(FlowMatchEulerDiscreteScheduler(shift=3.0), n)
    parent = FlowMatchEulerDiscreteScheduler(shift=3.0)
    parent.set_timesteps(n)
    sched = TimeTunerFlowMatchEulerDiscreteScheduler(shift=3.0, tuned_timesteps={n: shifted(grid)})
    sched.set_timesteps(n)
    x, noise = torch.ones(1, 3), torch.full((1, 3), 2.0)
    for i in range(n):
        assert torch.equal(sched.scale_noise(x, sched.timesteps[i:i + 1], noise),
                           parent.scale_noise(x, parent.timesteps[i:i + 1], noise))


def test_unipc_solver_p_refuses_a_table():
    with pytest.raises(ValueError, match="solver_p"):
        TimeTunerUniPCMultistepScheduler(solver_p=UniPCMultistepScheduler(), tuned_timesteps={2: [900.0, 400.0]})


def test_flow_tuned_step_reads_no_timestep_value(monkeypatch):
    """The pipeline loop (`for t in scheduler.timesteps: step(..., t, ...)`) hands back views of the taus:
    set_timesteps prepared their look-up, so no step reads a value (`.item()`, a device synchronisation on a GPU) or scans the
    table; a copy of a tau still takes the value look-up, with the same samples, and a view of another step's tau
    is still refused."""
    from diffusers_timetuner.schedulers import mixin

    grid = grid_of(FlowMatchEulerDiscreteScheduler(shift=3.0), 5)
    sched = TimeTunerFlowMatchEulerDiscreteScheduler(shift=3.0, tuned_timesteps={5: shifted(grid, top=1000)})
    calls = {"scalar": 0, "scan": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(mixin, "_scalar", counting("scalar", mixin._scalar))
    monkeypatch.setattr(mixin, "matching_indices", counting("scan", mixin.matching_indices))
    by_view = sample(sched, 5)  # SD3-style: no begin index, the first step finds its index itself
    assert calls == {"scalar": 0, "scan": 0}
    sched.set_timesteps(5)
    sched.set_begin_index(0)  # Flux-style
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(fake_model(x, t), t, x).prev_sample
    assert calls == {"scalar": 0, "scan": 0}
    # copies of the taus: the value look-up (one read per step), same result as the views
    sched.set_timesteps(5)
    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps.clone():
        x = sched.step(fake_model(x, t), t.clone(), x).prev_sample
    assert calls["scalar"] == 6  # one per step, and the first step's own search for its index
    assert torch.equal(x, by_view)
    sched.set_timesteps(5)
    sched.set_begin_index(0)
    with pytest.raises(ValueError, match="of step 1, but the scheduler is at step 0"):
        sched.step(torch.zeros(1), sched.timesteps[1], torch.zeros(1))
    # an in-place edit of the taus makes the prepared look-up stale: the edited value is what the step accepts
    sched.set_timesteps(5)
    sched.timesteps[0] += 40.0
    sched.step(torch.zeros(1), sched.timesteps[0].clone(), torch.zeros(1))
    assert sched.step_index == 1


def test_unipc_flow_table_may_feed_the_top_of_the_flow_time_range():
    # flow sigmas run up to 1, i.e. t = num_train_timesteps (1000); a calibrated first tau of 1000.0 must load there,
    # while a VP UniPC (trained on t in [0, 999]) still refuses it
    table = {2: [1000.0, 400.0]}
    flow = TimeTunerUniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            tuned_timesteps=table)
    assert flow.config.tuned_timesteps["2"] == [1000.0, 400.0]
    with pytest.raises(ValueError, match="outside the training range"):
        TimeTunerUniPCMultistepScheduler(tuned_timesteps=table)
