"""TimeTuner Heun (EDM's second-order sampler) against `HeunDiscreteScheduler`: 2n - 1 evaluations, one tau each."""
import pytest
import torch
from diffusers import HeunDiscreteScheduler

from diffusers_timetuner import TimeTunerHeunDiscreteScheduler
from test_schedulers_flow import fake_model, sample, t_free_model

CASES = [
    dict(timestep_spacing=spacing, prediction_type=pred)
    for spacing in ("linspace", "leading", "trailing") for pred in ("epsilon", "v_prediction", "sample")
] + [dict(use_karras_sigmas=True), dict(beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")]


def spread(grid):
    """Distinct taus near the grid (it repeats every time after the first): t_j +- 0.5 (j + 1), inside [0, 999]."""
    return [t + 0.5 * (j + 1) if t < 990 else t - 0.5 * (j + 1) for j, t in enumerate(grid)]


@pytest.mark.parametrize("config", CASES)
def test_untuned_is_the_parent_and_any_table_steps_like_it(config):
    n = 4
    ref = sample(HeunDiscreteScheduler(**config), n)
    assert torch.equal(sample(TimeTunerHeunDiscreteScheduler(**config), n), ref)
    parent = HeunDiscreteScheduler(**config)
    parent.set_timesteps(n)
    grid = parent.timesteps.tolist()
    assert len(grid) == 2 * n - 1  # two evaluations per step, one in the last
    sched = TimeTunerHeunDiscreteScheduler(**config, tuned_timesteps={n: spread(grid)}, tuned_grids={n: grid})
    seen = []
    tuned = sample(sched, n, spy=seen)
    assert seen == pytest.approx(spread(grid), abs=1e-4) and len(seen) == 2 * n - 1
    assert torch.equal(sched.grid_timesteps, parent.timesteps) and torch.equal(sched.sigmas, parent.sigmas)
    assert not torch.allclose(tuned, ref)
    # a network that ignores its timestep: the solver takes exactly the parent's steps
    assert torch.equal(sample(sched, n, model=t_free_model), sample(HeunDiscreteScheduler(**config), n,
                                                                        model=t_free_model))


def test_table_length_is_2n_minus_1():
    with pytest.raises(ValueError, match=r"has 4 values but 4 inference steps make 7 model evaluations"):
        TimeTunerHeunDiscreteScheduler(tuned_timesteps={4: [900.0, 600.0, 300.0, 10.0]})
    parent = HeunDiscreteScheduler()
    parent.set_timesteps(3)
    sched = TimeTunerHeunDiscreteScheduler(tuned_timesteps={3: spread(parent.timesteps.tolist())})
    with pytest.raises(ValueError, match=r"num_inference_steps \[3\], not for 4"):
        sched.set_timesteps(4)
    with pytest.raises(ValueError, match="duplicate"):
        TimeTunerHeunDiscreteScheduler(tuned_timesteps={3: parent.timesteps.tolist()})  # the grid repeats times
    sched.set_timesteps(3)
    x = torch.zeros(1, 2)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="of step 2, but the scheduler is at step 1"):
        sched.step(x, sched.timesteps[2], x)


def test_round_trip_keeps_parent_keys_and_table(tmp_path):
    n = 3
    parent = HeunDiscreteScheduler(prediction_type="v_prediction")
    parent.set_timesteps(n)
    taus = spread(parent.timesteps.tolist())
    sched = TimeTunerHeunDiscreteScheduler(prediction_type="v_prediction", tuned_timesteps={n: taus})
    sched.save_pretrained(tmp_path)
    for again in (TimeTunerHeunDiscreteScheduler.from_pretrained(tmp_path),
                  TimeTunerHeunDiscreteScheduler.from_config(sched.config)):
        assert {k for k in parent.config if not k.startswith("_")} <= set(again.config)
        assert again.config.prediction_type == "v_prediction"
        assert torch.equal(sample(again, n), sample(sched, n))
    other = sched.with_tuned_timesteps(n, [t - 1.0 for t in taus])
    other.set_timesteps(n)
    assert other.timesteps.tolist() == pytest.approx([t - 1.0 for t in taus], abs=1e-4)
