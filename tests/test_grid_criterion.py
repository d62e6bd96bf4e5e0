"""grid_search_criterion: how the grid search scores a candidate from the per-sample endpoint errors."""

import math

import pytest
import torch

from diffusers_timetuner.calibration import CalibrationConfig, calibrate
from diffusers_timetuner.calibration.grid_search import (
    DEFAULT_GRID_CRITERION, GRID_CRITERIA, GridEvaluator, pattern_search, per_sample_score, resolve_grid_criterion,
)
from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler, TimeTunerDDPMScheduler


class _Outlier:
    """A one-point grid t scored on five samples: four want t = 300 (e = (t - 300)^2 + 1), one outlier wants t = 700
    with errors 1000x larger (e = 1000 ((t - 700)^2 + 1)); ``criterion`` as in the grid search."""

    def __init__(self, criterion):
        self.criterion = criterion

    def loss(self, grid, reuse=0):
        t = float(grid[0])
        errors = torch.tensor([(t - 300) ** 2 + 1] * 4 + [1000 * ((t - 700) ** 2 + 1)], dtype=torch.float64)
        return float(per_sample_score(errors, self.criterion).sum())

    def accept(self, grid):
        return self.loss(grid)

    def adopt_last(self):
        pass


def test_log_mean_follows_the_many_samples_where_the_mean_follows_the_outlier():
    # Hand-derived optima. mean: minimise 4 (t - 300)^2 + 1000 (t - 700)^2 -> t = (4 * 300 + 1000 * 700) / 1004
    # = 698.4, the integer search ends at 698. log_mean: 4 log((t - 300)^2 + 1) + log((t - 700)^2 + 1) is 11.98 at
    # t = 300 and 47.9 at t = 700; from t = 500 its slope (+0.04 - 0.01 per step) leads down to 300.
    assert pattern_search(_Outlier("mean"), [500], 999, max_evaluations=500).grid == [698]
    assert pattern_search(_Outlier("log_mean"), [500], 999, max_evaluations=500).grid == [300]


def test_grid_evaluator_sums_the_criterion_of_each_samples_squared_endpoint_error():
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    target = torch.zeros_like(noise)
    ev = GridEvaluator(lambda x, t, cond=None: 0.1 * x, TimeTunerDDIMScheduler(clip_sample=False),
                       [dict(noise=noise, cond=None, seed=0, target=target)])
    finals, _ = ev.finals([900, 500, 100])
    errors = (finals[0] - target).double().pow(2).flatten(1).sum(1)  # e_i, computed here by hand
    assert float(ev.loss_of(finals)) == pytest.approx(float(errors.sum()), rel=1e-12)
    ev.criterion = "log_mean"
    assert float(ev.loss_of(finals)) == pytest.approx(sum(math.log(float(e) + 1e-12) for e in errors), rel=1e-12)


def test_auto_resolves_to_the_default_and_stochastic_samplers_keep_the_energy_distance():
    assert DEFAULT_GRID_CRITERION in GRID_CRITERIA
    assert resolve_grid_criterion("auto", "endpoint_mse") == DEFAULT_GRID_CRITERION
    assert resolve_grid_criterion("mean", "endpoint_mse") == "mean"
    assert resolve_grid_criterion("auto", "energy_distance") == "energy_distance"
    with pytest.raises(ValueError, match="stochastic"):
        resolve_grid_criterion("log_mean", "energy_distance")
    with pytest.raises(ValueError, match="grid_search_criterion must be one of"):
        per_sample_score(torch.ones(3), "median")


def _never_called(*a, **k):
    raise AssertionError("evaluated the network")


@pytest.mark.parametrize("kwargs, message", [
    (dict(tune="grid", grid_search_criterion="median"), "grid_search_criterion must be 'auto' or one of"),
    (dict(tune="grid", grid_search_criterion=None), "grid_search_criterion must be 'auto' or one of"),
    (dict(tune="tau", grid_search_criterion="log_mean"), "needs tune='grid' or 'grid\\+tau'"),
])
def test_bad_criteria_are_refused_before_any_evaluation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(_never_called, TimeTunerDDIMScheduler(), 4, sample_shape=(1, 4, 4), **kwargs)


def test_an_explicit_criterion_on_a_stochastic_sampler_is_refused_before_the_search():
    from diffusers_timetuner.testbeds import load_gmm_pipeline

    pipe = load_gmm_pipeline()

    class Counting(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.calls, self.config = net, 0, net.config

        def forward(self, x, t, **kw):
            self.calls += 1
            return self.net(x, t, **kw)

    model = Counting(pipe.unet)
    with pytest.raises(ValueError, match="judged by the energy_distance"):
        calibrate(model, TimeTunerDDPMScheduler.from_config(pipe.scheduler.config), 4, tune="grid",
                  grid_search_criterion="log_mean", num_samples=4, batch_size=4, num_validation_samples=4,
                  num_heldout_samples=4, progress=False)
    assert model.calls <= 2  # only the fractional-timestep probe ran (its two calls)


def test_cli_offers_the_criterion_from_the_config():
    from diffusers_timetuner.cli.calibrate import parse_args

    args = parse_args(["--tune", "grid", "--grid_search_criterion", "log_mean"])
    assert args.config.grid_search_criterion == "log_mean"
    assert parse_args([]).config.grid_search_criterion == CalibrationConfig().grid_search_criterion == "auto"
    with pytest.raises(SystemExit) as err:
        parse_args(["--tune", "grid", "--grid_search_criterion", "median"])
    assert err.value.code == 2


@pytest.mark.parametrize("criterion", GRID_CRITERIA)
def test_each_criterion_learns_a_grid_on_the_exact_gmm_and_records_it(criterion):
    """DDIM@6 on the exact mixture (light-tailed errors): either criterion learns a grid the guard ships, and the
    report says which criterion scored it (the calibration losses are per sample in that criterion's units)."""
    from diffusers_timetuner.testbeds import load_gmm_pipeline

    pipe = load_gmm_pipeline()
    res = calibrate(pipe, TimeTunerDDIMScheduler.from_config(pipe.scheduler.config), 6, tune="grid",
                    grid_search_criterion=criterion, num_samples=48, batch_size=48, num_validation_samples=48,
                    num_heldout_samples=96, teacher_steps=60, progress=False)
    rep = res.reports[6]
    search = rep.grid_tuning["search"]
    assert search["criterion"] == criterion and res.settings["grid_search_criterion"] == criterion
    assert search["loss"] <= min(search["loss_default"], search["loss_dp"])  # the search never ends worse
    # held-out, the learned grid beats the default one (test_grid_tuning.py measured about -40% with the mean; here
    # only that the guard shipped a grid and the held-out change is negative)
    assert rep.grid_tuning["chosen"] == "grid" and rep.heldout["relative_change"] < 0
