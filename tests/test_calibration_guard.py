"""The calibration seams: the guard's rule, the paired statistics, the optimiser protocols."""

import math

import pytest
import torch

from diffusers_timetuner.calibration.guard import choose_prefix, clearly_better
from diffusers_timetuner.calibration.optimizers import (
    JointAdam, JointOptimizer, LocalSearch, ReferenceAdam, StepOptimizer, StepProblem, get_optimizer,
)
from diffusers_timetuner.calibration.stats import paired_change


def test_paired_change_of_endpoint_errors_by_hand():
    untuned = torch.tensor([4.0, 6.0, 5.0, 7.0], dtype=torch.float64)
    tuned = torch.tensor([3.0, 4.0, 4.0, 5.0], dtype=torch.float64)
    change, se = paired_change("endpoint_mse", tuned, untuned)
    # by hand: differences -1, -2, -1, -2; mean -1.5; sample variance (4 * 0.25) / 3 = 1/3; SE sqrt(1/3) / 2
    assert change == pytest.approx(-1.5)
    assert se == pytest.approx(math.sqrt(1 / 3) / 2)


def test_the_guard_keeps_the_lowest_clearly_better_prefix():
    untuned = torch.tensor([4.0, 6.0, 5.0, 7.0], dtype=torch.float64)
    one = untuned - torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64)  # change -1.5, SE 0.2887 (above)
    noisy = untuned + torch.tensor([-9.0, 3.0, 3.0, 1.0], dtype=torch.float64)  # change -0.5, SE sqrt(33) / 2 = 2.87: noise
    decision = choose_prefix([untuned, one, noisy], "endpoint_mse", margin=2.0)
    assert decision.keep == 1  # -1.5 beats 2 * 0.2887; the noisy prefix is not clearly better
    assert decision.errors == pytest.approx([5.5, 4.0, 5.0])
    assert decision.changes[0] == (0.0, 0.0)
    # margin 6: 1.5 < 6 * 0.2887 = 1.73, nothing is clearly better -> tau = t
    assert choose_prefix([untuned, one, noisy], "endpoint_mse", margin=6.0).keep == 0


def test_clearly_better_rule():
    assert clearly_better(-1.0, 0.4, 2.0)  # 1.0 > 0.8
    assert not clearly_better(-1.0, 0.5, 2.0)  # not more than 2 SE
    assert not clearly_better(0.5, 0.0, 0.0)  # worse is never better
    assert clearly_better(-1e-9, 0.0, 0.0)  # margin 0: any improvement


def test_optimisers_implement_one_protocol_each():
    assert isinstance(LocalSearch(), StepOptimizer) and not isinstance(LocalSearch(), JointOptimizer)
    assert isinstance(ReferenceAdam(), StepOptimizer) and not isinstance(ReferenceAdam(), JointOptimizer)
    assert isinstance(JointAdam(), JointOptimizer)
    with pytest.raises(ValueError, match="fit_step"):
        get_optimizer(object())


def test_local_search_fit_step_poses_the_problem_it_was_given():
    problem = StepProblem(t0=500.0, spacing=100.0, bounds=(0.0, 999.0), loss=lambda tau: (tau - 512.3) ** 2,
                          minibatch_loss=None, reduce_grad=None, backward_samples=lambda: 0)
    fit = LocalSearch(xtol=0.5).fit_step(problem)
    assert abs(fit.tau - 512.3) <= 0.5 and fit.loss_after <= fit.loss_before and fit.backward_samples == 0


def test_reference_adam_fit_step_descends_a_quadratic():
    calls = []
    problem = StepProblem(
        t0=500.0, spacing=100.0, bounds=(0.0, 999.0), loss=lambda tau: (tau - 520.0) ** 2,
        minibatch_loss=lambda tau, k: (calls.append(k) or (tau - 520.0) ** 2), reduce_grad=lambda g: g,
        backward_samples=lambda: 7)
    fit = ReferenceAdam(num_steps=20, lr=2e-3).fit_step(problem)
    assert calls == list(range(20))  # one mini-batch per Adam iteration, k = 0 .. num_steps - 1
    assert 500.0 < fit.tau < 520.0 and fit.loss_after < fit.loss_before
    assert (fit.evaluations, fit.backward_samples) == (20, 7)
