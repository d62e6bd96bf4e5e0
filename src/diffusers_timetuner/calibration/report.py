"""What a calibration run reports: per-step records, held-out errors (tuned vs untuned), JSON and a PNG plot."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..sampling import init_noise_sigma, sample_trajectory
from ..table import HeldOutResult
from .stats import metric_value, paired_change

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """One tuned step (sampling-order index ``step``; grid time ``t`` = t_i, tuned ``tau`` = tau_i).

    ``loss_before`` / ``loss_after``: the calibration objective at tau = t_i and at the kept tau (calibration set).
    ``proposed_tau``: what the optimiser found; ``kept=False`` when the validation guard refused it.
    ``forward_samples``: samples pushed through the network for this step (all processes; a CFG call counts two);
    ``backward_samples``: those of them that were also back-propagated (Adam only).
    """

    step: int
    t: float
    tau: float
    proposed_tau: float
    kept: bool
    loss_before: float
    loss_after: float
    objective_evaluations: int
    forward_samples: int
    backward_samples: int
    seconds: float
    validation_before: Optional[float] = None
    validation_after: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class StepCountReport:
    """The result for one step count n."""

    num_inference_steps: int
    grid: List[float]
    taus: List[float]
    steps: List[StepRecord]
    heldout: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    forward_samples: int = 0
    backward_samples: int = 0
    warnings: List[str] = field(default_factory=list)
    grid_tuning: Optional[Dict[str, Any]] = None  # tune="grid" / "grid+tau": the search, the guard's verdicts
    teacher: Optional[Dict[str, Any]] = None  # the reference: solver, steps, its own error to a longer run

    @property
    def worse_than_untuned(self) -> bool:
        return bool(self.heldout.get("worse_than_untuned", False))

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["steps"] = [s.to_dict() for s in self.steps]
        d["worse_than_untuned"] = self.worse_than_untuned
        return d


@torch.no_grad()
def evaluate_heldout(rollout, tuned_scheduler, teacher, noise, cond, dist, batch_size: int,
                     metric: str = "endpoint_mse") -> Dict[str, Any]:
    """Held-out errors of the tuned and the untuned sampler against the teacher, from fresh x_T.

    Both samplers run through :func:`~diffusers_timetuner.sampling.sample_trajectory` (the inference path) with the
    real tuned scheduler. ``endpoint_mse``: mean over samples of the squared distance (sum over pixels) between the
    final sample and the teacher's final sample from the same noise; ``trajectory_mse``: the same at every coarse
    grid time the teacher's grid contains (None elsewhere), after step j (entry j is the state at grid[j + 1], the
    last entry the final sample).

    ``metric`` decides the verdict (``relative_change``, ``worse_than_untuned``; also given explicitly as
    ``metric`` / ``untuned`` / ``tuned``): ``endpoint_mse``, or ``energy_distance`` between the whole set of final
    samples and the teacher's (stochastic samplers: their per-sample MSE rewards shrinking the sample spread).
    """
    from ..denoiser import slice_conditioning

    grid = rollout.grid_list
    n = len(grid)  # one entry per model evaluation (2n - 1 for Heun)
    sums = {"tuned": torch.zeros(n, dtype=torch.float64), "untuned": torch.zeros(n, dtype=torch.float64)}
    have = torch.zeros(n, dtype=torch.float64)
    finals = torch.zeros((3, *noise.shape), dtype=torch.float64) if metric == "energy_distance" else None
    ends = torch.zeros((2, noise.shape[0]), dtype=torch.float64)  # per-sample endpoint errors (tuned, untuned)
    for idx in dist.shard(noise.shape[0], batch_size):
        x = noise[idx].to(rollout.device)
        c = slice_conditioning(cond, idx)
        sigma_T = float(init_noise_sigma(rollout.scheduler))
        targets = teacher.targets(x * sigma_T, sigma_T, c, grid)[1:]
        if finals is not None:
            finals[2, idx] = targets[-1].double().cpu()
        for k, (name, sched) in enumerate((("tuned", tuned_scheduler), ("untuned", rollout.scheduler))):
            sched = copy.deepcopy(sched)
            rollout.set_grid(sched)  # the rollout's grid (a custom one too); sampling keeps it (steps=None)
            states = sample_trajectory(rollout.denoiser, sched, x, None, c,
                                       eta=rollout.eta, generator=torch.Generator().manual_seed(1))[1:]
            if finals is not None:
                finals[k, idx] = states[-1].double().cpu()
            ends[k, idx] = (states[-1] - targets[-1]).double().pow(2).flatten(1).sum(1).cpu()
            for j, (s, tgt) in enumerate(zip(states, targets)):
                if tgt is not None:
                    sums[name][j] += ((s - tgt).double().pow(2).flatten(1).sum(1)).sum().cpu()
                    if name == "tuned":
                        have[j] += len(idx)
    tuned, untuned, count = dist.sum(sums["tuned"]), dist.sum(sums["untuned"]), dist.sum(have)
    traj = lambda v: [float(v[j] / count[j]) if count[j] > 0 else None for j in range(n)]  # noqa: E731
    result = {
        "num_samples": int(noise.shape[0]),
        "teacher_steps": teacher.num_inference_steps,
        "endpoint_mse_tuned": float(tuned[-1] / count[-1]),
        "endpoint_mse_untuned": float(untuned[-1] / count[-1]),
        "trajectory_mse_tuned": traj(tuned),
        "trajectory_mse_untuned": traj(untuned),
    }
    result["metric"] = metric
    ends = dist.sum(ends)
    result["endpoint_mse_change_se"] = paired_change("endpoint_mse", ends[0], ends[1])[1] if len(ends[0]) > 1 else None
    if finals is None:
        result["untuned"], result["tuned"] = result["endpoint_mse_untuned"], result["endpoint_mse_tuned"]
        result["change_se"] = result["endpoint_mse_change_se"]
    else:
        finals = dist.sum(finals)
        result["energy_distance_untuned"] = metric_value(metric, finals[1], finals[2])
        result["energy_distance_tuned"] = metric_value(metric, finals[0], finals[2])
        result["untuned"], result["tuned"] = result["energy_distance_untuned"], result["energy_distance_tuned"]
        result["change_se"] = paired_change(metric, finals[0], finals[1], finals[2])[1]
    # Relative to |untuned|: an unbiased energy distance can be slightly negative.
    result["relative_change"] = (result["tuned"] - result["untuned"]) / max(abs(result["untuned"]), 1e-30)
    result["worse_than_untuned"] = result["tuned"] > result["untuned"]
    return result


def heldout_record(held: Dict[str, Any]) -> HeldOutResult:
    """The typed held-out record of an :func:`evaluate_heldout` result (what a table's ``tuning_info`` keeps)."""
    return HeldOutResult(held["metric"], held["untuned"], held["tuned"], change_se=held["change_se"],
                         relative_change=held["relative_change"], endpoint_mse_untuned=held["endpoint_mse_untuned"],
                         endpoint_mse_tuned=held["endpoint_mse_tuned"])


def write_report(path: str, payload: Dict[str, Any]) -> None:
    from .checkpoint import atomic_write_json

    atomic_write_json(path, json.loads(json.dumps(payload, default=_jsonable)))


def _jsonable(obj):
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


def plot_report(path: str, reports: List[StepCountReport]) -> None:
    """PNG: tau_i - t_i against t_i per step count (left) and held-out per-step trajectory error (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for rep in reports:
        n = rep.num_inference_steps
        ax1.plot(rep.grid, [tau - t for tau, t in zip(rep.taus, rep.grid)], "o-", label=f"n={n}")
        tuned, untuned = rep.heldout.get("trajectory_mse_tuned"), rep.heldout.get("trajectory_mse_untuned")
        if tuned:
            times = rep.grid[1:] + [0.0]
            pts = [(t, a, b) for t, a, b in zip(times, tuned, untuned) if a is not None]
            if pts:
                ax2.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label=f"n={n} untuned")
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"n={n} tuned")
    ax1.axhline(0.0, color="grey", lw=0.8)
    ax1.set_xlabel("grid time t_i")
    ax1.set_ylabel("tau_i - t_i")
    ax1.set_title("tuned timesteps")
    ax1.invert_xaxis()
    ax1.legend()
    ax2.set_xlabel("grid time after the step")
    ax2.set_ylabel("held-out MSE to teacher")
    ax2.set_title("trajectory error (held-out)")
    ax2.set_yscale("log")
    ax2.invert_xaxis()
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
