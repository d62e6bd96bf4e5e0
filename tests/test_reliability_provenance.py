"""Bad tables and tables loaded into a scheduler they were not made for: each is refused with a clear ValueError."""

import json

import pytest
from diffusers import DDIMScheduler

from diffusers_timetuner import hub
from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler, TimeTunerEulerDiscreteScheduler

# A non-identity 4-step table on DDIM's default "leading" grid for T = 1000: 1000 // 4 = 250 apart, [750, 500, 250, 0].
GRID4 = [750, 500, 250, 0]
TAUS4 = [740.5, 512.25, 243.0, 3.5]


def _calibrated_ddim(**config):
    """A DDIM table created the way calibration creates it (with_tuned_timesteps with provenance info)."""
    return TimeTunerDDIMScheduler(**config).with_tuned_timesteps(4, TAUS4, grid=GRID4, info={"objective": "test"})


@pytest.mark.parametrize(
    "taus, match",
    [
        ([1e39, 500.0, 250.0, 0.0], "float32"),  # finite in float64, inf in float32 (max ~3.4e38)
        ([1000.0, 500.0, 250.0, 0.0], r"outside the training range \[0, 999\]"),
        ([3.5, 243.0, 512.25, 740.5], "not in sampling order"),  # TAUS4 reversed
    ],
)
def test_bad_taus_are_refused(taus, match):
    with pytest.raises(ValueError, match=match):
        TimeTunerDDIMScheduler(tuned_timesteps={"4": taus})


@pytest.mark.parametrize(
    "grid, match",
    [([0, 250, 500, 750], "strictly descending"), ([1000, 500, 250, 0], r"must lie in \[0, 999\]")],
)
def test_bad_grids_are_refused(grid, match):
    with pytest.raises(ValueError, match=match):
        TimeTunerDDIMScheduler(tuned_timesteps={"4": TAUS4}, tuned_grids={"4": grid})


@pytest.mark.parametrize("n", [-3, 0, 2.5, True])
@pytest.mark.parametrize("tuned", [False, True])
def test_set_timesteps_needs_a_positive_integer(n, tuned):
    sched = _calibrated_ddim() if tuned else TimeTunerDDIMScheduler()
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be a positive integer"):
        sched.set_timesteps(n)


def test_calibrated_table_records_what_it_was_made_for():
    made_for = _calibrated_ddim().config.tuning_info["4"]["made_for"]
    assert made_for["class_name"] == "TimeTunerDDIMScheduler"
    # DDIMScheduler's defaults
    assert (made_for["beta_schedule"], made_for["beta_start"], made_for["beta_end"]) == ("linear", 0.0001, 0.02)
    assert made_for["prediction_type"] == "epsilon" and made_for["timestep_spacing"] == "leading"


def test_ddim_table_is_refused_by_euler(tmp_path):
    sched = _calibrated_ddim()
    with pytest.raises(ValueError, match=r"class_name: table 'TimeTunerDDIMScheduler', scheduler "
                                         r"'TimeTunerEulerDiscreteScheduler'"):
        TimeTunerEulerDiscreteScheduler.from_config(sched.config)
    sched.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="made for another scheduler"):
        TimeTunerEulerDiscreteScheduler.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="made for another scheduler"):
        hub.load_tuned_scheduler(str(tmp_path), TimeTunerEulerDiscreteScheduler)
    # the matching class still loads it
    assert hub.load_tuned_scheduler(str(tmp_path)).config.tuned_timesteps == {"4": TAUS4}


def test_edited_class_name_is_refused(tmp_path):
    _calibrated_ddim().save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["_class_name"] = "TimeTunerEulerDiscreteScheduler"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="class_name: table 'TimeTunerDDIMScheduler'"):
        hub.load_tuned_scheduler(str(tmp_path))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"timestep_spacing": "trailing"}, "timestep_spacing"),
        ({"steps_offset": 1}, "steps_offset"),
    ],
)
def test_other_noise_schedule_or_grid_settings_are_refused(change, named):
    sched = _calibrated_ddim()
    with pytest.raises(ValueError, match=rf"made for another scheduler .*{named}: table"):
        TimeTunerDDIMScheduler.from_config(sched.config, **change)


def test_gridless_table_with_provenance_is_checked_on_another_grid():
    sched = TimeTunerDDIMScheduler().with_tuned_timesteps(4, TAUS4, info={"objective": "test"})
    assert sched.config.tuned_grids is None
    with pytest.raises(ValueError, match="timestep_spacing: table 'leading', scheduler 'trailing'"):
        TimeTunerDDIMScheduler.from_config(sched.config, timestep_spacing="trailing")


def test_plain_diffusers_class_is_refused_by_load_tuned_scheduler(tmp_path):
    config = dict(_calibrated_ddim().config)
    DDIMScheduler.from_config(config).save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    saved = json.loads(path.read_text())
    saved.update(tuned_timesteps={"4": TAUS4})  # a plain class config carrying a table
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="builds a DDIMScheduler, which is not a TimeTuner scheduler"):
        hub.load_tuned_scheduler(str(tmp_path))


def test_json_array_config_is_refused(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        hub.load_tuned_scheduler(str(tmp_path))


@pytest.mark.parametrize("name", hub.list_bundled_schedules())
def test_bundled_tables_without_provenance_still_load(name):
    sched = hub.load_tuned_scheduler(name)
    assert sched.tuned_step_counts


def test_table_made_from_another_familys_config_records_only_its_own_settings(tmp_path):
    """A Heun scheduler converted from a DDIM config keeps DDIM-only keys (e.g. `rescale_betas_zero_snr`) as hidden
    config entries; a table made on it must record (and check) only Heun's own settings, else the new scheduler
    refuses its own table (this failed before: 'rescale_betas_zero_snr: table False, scheduler has no such
    setting')."""
    from diffusers import DDIMScheduler

    from diffusers_timetuner import TimeTunerHeunDiscreteScheduler

    DDIMScheduler().save_pretrained(tmp_path)  # a pipeline's saved scheduler, as calibration receives it
    heun = TimeTunerHeunDiscreteScheduler.from_config(DDIMScheduler.from_pretrained(tmp_path).config)
    assert "rescale_betas_zero_snr" in heun.config  # the hidden DDIM key this test is about
    heun.set_timesteps(3)
    grid = [float(t) for t in heun.timesteps]
    taus = [t + 0.3 * (j + 1) for j, t in enumerate(grid)]  # distinct even where Heun's grid repeats a time
    tuned = heun.with_tuned_timesteps(3, taus, grid=None, info={"objective": "endpoint"})
    made_for = tuned.config.tuning_info["3"]["made_for"]
    assert "rescale_betas_zero_snr" not in made_for and made_for["class_name"] == "TimeTunerHeunDiscreteScheduler"
    tuned.set_timesteps(3)
    assert tuned.timesteps.tolist() == pytest.approx(taus, abs=1e-3)
