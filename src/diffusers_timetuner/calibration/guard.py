"""The validation guard: which prefix of a tuned table calibration ships.

Candidates are the prefix tables "tau_K .. tau_{k+1} tuned, the rest untuned" for k = 0 (untuned) .. all tuned,
each judged as a whole on a validation set disjoint from the calibration set (later tuned steps may compensate an
earlier one, which a per-step check with the rest untuned would wrongly refuse: measured on the MNIST UNet,
teacher_local's first step alone doubles the validation error, the full table lowers it). The rule: keep the prefix
with the lowest validation error among those *clearly better* than untuned, i.e. better by more than ``margin``
paired standard errors (the longer prefix on ties), else none. Picking the minimum of n + 1 noisy estimates would
otherwise ship tables that are better by chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .stats import metric_value, paired_change


def clearly_better(change: float, se: float, margin: float) -> bool:
    """A candidate beats untuned only when its error change is negative and larger than ``margin`` standard errors."""
    return change < 0 and -change > margin * se


@dataclass
class GuardDecision:
    """The guard's verdict over the prefixes k = 0 .. K.

    Attributes:
        keep: how many leading tuned steps to ship (0: none, tau = t).
        errors: validation error of each prefix (entry 0: untuned).
        changes: (error change vs untuned, its paired SE) of each prefix (entry 0: (0, 0)).
    """

    keep: int
    errors: List[float]
    changes: List[Tuple[float, float]]


def choose_prefix(outputs: Sequence[torch.Tensor], metric: str, margin: float,
                  reference: Optional[torch.Tensor] = None) -> GuardDecision:
    """Apply the rule to per-sample validation ``outputs`` of each prefix (entry 0: untuned; outputs and
    ``reference`` as in :func:`~diffusers_timetuner.calibration.stats.metric_value`)."""
    errors = [metric_value(metric, o, reference) for o in outputs]
    changes = [(0.0, 0.0)] + [paired_change(metric, o, outputs[0], reference) for o in outputs[1:]]
    eligible = [k for k in range(1, len(outputs)) if clearly_better(*changes[k], margin)]
    keep = min(eligible, key=lambda k: (errors[k], -k)) if eligible else 0
    return GuardDecision(keep, errors, changes)
