"""The tau table: parsing, normalisation to JSON form, and one clear error per kind of bad input."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from diffusers_timetuner.table import (
    TauTable,
    TunedTimestepsWarning,
    normalize_step_key,
    normalize_tuning_config,
    parse_tau_tables,
    timesteps_close,
)


def test_keys_are_normalised_to_strings_and_values_to_floats():
    tables, taus, grids, info = normalize_tuning_config(
        {4: np.array([900.5, 600, 300, 10]), "2": torch.tensor([800.0, 100.0])},
        {"4": [999, 666, 333, 0]},
        {4: {"objective": "paper", "guidance_scale": 7.5}},
        num_train_timesteps=1000,
    )
    assert taus == {"2": [800.0, 100.0], "4": [900.5, 600.0, 300.0, 10.0]}
    assert all(type(v) is float for vs in taus.values() for v in vs)
    assert grids == {"4": [999, 666, 333, 0]} and all(type(v) is int for v in grids["4"])
    assert info == {"4": {"objective": "paper", "guidance_scale": 7.5}}
    assert tables[4] == TauTable(4, (900.5, 600.0, 300.0, 10.0), (999, 666, 333, 0))
    assert tables[2].grid is None and tables[4].key == "4" and tables[4].n == 4
    # The normalised form is plain JSON and survives a round trip unchanged.
    assert json.loads(json.dumps({"t": taus, "g": grids, "i": info})) == {"t": taus, "g": grids, "i": info}


def test_empty_and_none_stay_as_given():
    assert normalize_tuning_config(None) == ({}, None, None, None)
    assert normalize_tuning_config({}, {}, {}) == ({}, {}, {}, {})


@pytest.mark.parametrize("key", [10, "10", " 10 ", np.int64(10)])
def test_valid_step_keys(key):
    assert normalize_step_key(key) == "10"


@pytest.mark.parametrize("key", [0, -3, "0", "-3", "10.0", "ten", 10.0, True, None, "", "1e3"])
def test_invalid_step_keys(key):
    with pytest.raises(ValueError, match="not a step count"):
        parse_tau_tables({key: [1.0]})


def test_wrong_length():
    with pytest.raises(ValueError, match=r"has 3 values but 4 inference steps make 4 model evaluations"):
        parse_tau_tables({"4": [900.0, 600.0, 300.0]})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite(bad):
    with pytest.raises(ValueError, match="non-finite"):
        parse_tau_tables({"3": [900.0, bad, 100.0]})


def test_negative():
    with pytest.raises(ValueError, match=r"negative values at \(index, value\) \[\(2, -0.5\)\]"):
        parse_tau_tables({"3": [900.0, 400.0, -0.5]})


def test_duplicates_within_lookup_tolerance():
    # 500.0 and 500.0004 differ by 4e-4 < 1e-5 + 1e-6 * 500 = 5.1e-4 (TAU_ATOL + TAU_RTOL * |t|): the same step.
    with pytest.raises(ValueError, match=r"duplicate values: tau\[0\] = 500.0004 and tau\[1\] = 500.0"):
        parse_tau_tables({"3": [500.0004, 500.0, 300.0]})
    # 6e-4 apart is above that tolerance: accepted.
    parse_tau_tables({"3": [500.0006, 500.0, 300.0]})
    assert timesteps_close(500.0, 500.0004) and not timesteps_close(500.0, 500.0006)


def test_not_numbers():
    with pytest.raises(ValueError, match="is not a real number"):
        parse_tau_tables({"2": [900.0, "100"]})
    with pytest.raises(ValueError, match="must be a list of numbers"):
        parse_tau_tables({"2": "900, 100"})
    with pytest.raises(ValueError, match="must be a dict"):
        parse_tau_tables([900.0, 100.0])


def test_grid_length_mismatch_and_orphans():
    with pytest.raises(ValueError, match=r"`tuned_grids\[\"2\"\]` has 3 values but `tuned_timesteps\[\"2\"\]` has 2"):
        parse_tau_tables({"2": [900.0, 100.0]}, {"2": [999, 500, 0]})
    with pytest.raises(ValueError, match=r"`tuned_grids` has entries for step counts \[5\] that have no table"):
        parse_tau_tables({"2": [900.0, 100.0]}, {"5": [1, 2, 3, 4, 5]})
    with pytest.raises(ValueError, match=r"`tuning_info` has entries for step counts \[3\]"):
        parse_tau_tables({"2": [900.0, 100.0]}, None, {"3": {}})


def test_info_must_be_json():
    with pytest.raises(ValueError, match="is not plain JSON"):
        parse_tau_tables({"2": [900.0, 100.0]}, None, {"2": {"loss": torch.tensor(1.0)}})
    with pytest.raises(ValueError, match="must be a dict"):
        parse_tau_tables({"2": [900.0, 100.0]}, None, {"2": [1, 2]})


def test_duplicate_key_spellings():
    with pytest.raises(ValueError, match="step count 2 twice"):
        parse_tau_tables({2: [900.0, 100.0], "2": [800.0, 100.0]})


def test_out_of_range_is_refused_not_clamped():
    match = r"outside the training range \[0, 999\] at \(index, value\) \[\(0, 1003.5\)\]"
    with pytest.raises(ValueError, match=match):
        parse_tau_tables({"2": [1003.5, 100.0]}, num_train_timesteps=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_tau_tables({"2": [999.0, 0.0]}, num_train_timesteps=1000)  # the boundaries are in range
