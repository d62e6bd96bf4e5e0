"""The held-out record: calibration writes a HeldOutResult into tuning_info[n]["heldout"]; the hub reads it back
through one function, from a saved table and from the bundled tables' existing records."""

import pytest
from diffusers import DDPMScheduler

from diffusers_timetuner import hub
from diffusers_timetuner.calibration import calibrate
from diffusers_timetuner.table import HeldOutResult
from diffusers_timetuner.testbeds import load_gmm_pipeline

SMALL = dict(num_samples=8, batch_size=8, num_validation_samples=8, num_heldout_samples=8, teacher_steps=20,
             progress=False)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_round_trip_through_a_saved_table(scheduler, tmp_path):
    pipe = load_gmm_pipeline()
    sched = DDPMScheduler.from_config(pipe.scheduler.config) if scheduler == "ddpm" else "ddim"
    result = calibrate(pipe, sched, 4, **SMALL)
    result.save(str(tmp_path / "out"))
    loaded = hub.load_tuned_scheduler(str(tmp_path / "out"))
    held = hub.recorded_held_out(loaded.config.tuning_info["4"])
    report = result.reports[4].heldout
    # DDIM is judged by endpoint MSE, DDPM (stochastic) by energy distance (validation_metric="auto")
    assert held.metric == ("energy_distance" if scheduler == "ddpm" else "endpoint_mse")
    assert (held.untuned, held.tuned) == (report["untuned"], report["tuned"])
    assert (held.change_se, held.relative_change) == (report["change_se"], report["relative_change"])
    assert (held.endpoint_mse_untuned, held.endpoint_mse_tuned) == (report["endpoint_mse_untuned"],
                                                                    report["endpoint_mse_tuned"])
    assert held.worse_than_untuned == result.reports[4].worse_than_untuned
    assert HeldOutResult.from_json(held.to_json()) == held


def test_the_bundled_tables_records_read():
    for name in hub.list_bundled_schedules():
        scheduler = hub.load_tuned_scheduler(name)
        for n, info in scheduler.config.tuning_info.items():
            held = hub.recorded_held_out(info)
            assert held is not None and held.metric == "endpoint_mse", (name, n)
            # the bundled form carries the pair under its metric's name
            assert (held.untuned, held.tuned) == (info["heldout"]["endpoint_mse_untuned"],
                                                  info["heldout"]["endpoint_mse_tuned"])
            assert held.to_json() == info["heldout"]  # writing the record back gives the same JSON


def test_no_alias_and_no_guessing():
    assert hub.recorded_held_out({"held_out": {"endpoint_mse_tuned": 1.0, "endpoint_mse_untuned": 2.0}}) is None
    assert HeldOutResult.from_json({"note": "no numbers"}) is None
    assert HeldOutResult.from_json(None) is None
