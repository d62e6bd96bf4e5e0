"""Paired statistics of two samplers run from the same x_T: the errors the validation guard and the held-out report
compare, the paired change and its standard error.

Two metrics (``VALIDATION_METRICS``): ``endpoint_mse`` (per-sample squared endpoint errors to the teacher; their
mean, the SE of the per-sample differences) and ``energy_distance`` (the set of final samples against the teacher's
set; a joint bootstrap over samples for the SE). The bootstrap is written here rather than with
``scipy.stats.bootstrap``: the three sets' pairwise distances are computed once and each resample only indexes them
(scipy's would recompute the distances per resample), and its seeded resampling stream is what recorded tables hold.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..metrics import energy_distance

VALIDATION_METRICS = ("endpoint_mse", "energy_distance")


def metric_value(metric: str, outputs: torch.Tensor, reference: Optional[torch.Tensor] = None) -> float:
    """One sampler's error under ``metric`` from its per-sample ``outputs``: for ``endpoint_mse`` the squared endpoint
    errors (N,), whose mean it is; for ``energy_distance`` the final samples, against the ``reference`` samples."""
    if metric == "endpoint_mse":
        return float(outputs.mean())
    return energy_distance(outputs, reference)


def paired_change(metric: str, tuned: torch.Tensor, untuned: torch.Tensor,
                  reference: Optional[torch.Tensor] = None) -> Tuple[float, float]:
    """(error(tuned) - error(untuned), its standard error) under ``metric`` (outputs as in :func:`metric_value`).

    Both samplers ran from the same x_T, so the difference is paired: the SE of the per-sample differences for
    ``endpoint_mse`` (sample standard deviation / sqrt(N)), a joint bootstrap over samples for ``energy_distance``.
    SE 0 with fewer than 2 samples.
    """
    change = metric_value(metric, tuned, reference) - metric_value(metric, untuned, reference)
    if tuned.shape[0] < 2:
        return change, 0.0
    if metric == "endpoint_mse":
        # The formula of metrics.paired_difference, kept in the tensors' dtype with mean(a) - mean(b): the float64
        # mean(a - b) there differs in the last bits (float32 errors: change ~1e-4 relative), and recorded guard
        # decisions and reports hold these numbers.
        return change, float((tuned - untuned).std() / tuned.shape[0] ** 0.5)
    return change, energy_distance_change_se(tuned, untuned, reference)


def energy_distance_change_se(tuned: torch.Tensor, untuned: torch.Tensor, reference: torch.Tensor,
                              num_resamples: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of energy_distance(tuned, ref) - energy_distance(untuned, ref).

    Rows are resampled jointly (row i of the three sets shares its x_T). The reference's own term cancels in the
    difference; a point's distance to itself is 0, so the within-set U-statistic is sum / (N (N - 1)).
    """
    num = tuned.shape[0]
    a, b, r = (v.reshape(num, -1).double() for v in (tuned, untuned, reference))
    d_ar, d_br, d_aa, d_bb = torch.cdist(a, r), torch.cdist(b, r), torch.cdist(a, a), torch.cdist(b, b)
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(num_resamples):
        i = torch.randint(num, (num,), generator=gen)
        sub = lambda d: d[i][:, i]  # noqa: E731
        within = (sub(d_aa).sum() - sub(d_bb).sum()) / (num * (num - 1))
        diffs.append(2 * (sub(d_ar).mean() - sub(d_br).mean()) - within)
    return float(torch.stack(diffs).std())
