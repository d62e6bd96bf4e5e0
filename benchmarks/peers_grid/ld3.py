"""LD3: learned timesteps plus a decoupled model-input time, trained through the sampler.

Tong, Hoang, Kim, Nguyen, Le, Vu, Nguyen, "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025; public code
github.com/vinhsuhi/LD3. Written here from the paper and the repository's description of its trainer (no code
copied); what follows its published settings, and where this benchmark departs:

- Parameterisation (the repository's ``time`` mode): K + 1 free parameters xi (init 1), times =
  t_min + (t_max - t_min) * normalised, reversed cumulative sum of softmax(xi): strictly decreasing, exactly t_max
  and t_min at the ends for any xi. Decoupled model time: tau = times + clamp(eta, +-win_rate * smallest gap of the
  (detached) times), the two ends masked (tau_K = t_K); eta init 0, win_rate 0.5. The decoupled time is what the
  network sees while the solver integrates on the times: exactly a TimeTuner tau table.
- Training: x_T from a seed, the teacher's final sample as the target (``num_train`` 50 / ``num_valid`` 50 in the
  paper's CIFAR-10 runs; the loss is the per-sample mean squared error over pixels (the repository's ``L2``; its
  default LPIPS needs VGG weights from the internet, unavailable here), batch 2; RMSprop (lr 5e-3, momentum 0.9) on
  xi, SGD (lr 0.1 / K) on eta; gradient norms clipped at 1; ``rounds_v1`` rounds (2) with eta frozen, then
  ``rounds_v2`` rounds (5) with both; validation after every update, best parameters kept, patience 5, learning
  rates x0.8 on a plateau. Soft teacher forcing: each training / validation x_T may move (SGD, lr 12 / K) within an L2
  ball of radius 0.001 * pixels / K^2 around its original, accepted per sample when it lowers that sample's loss.
- Time: LD3's continuous VP time s = (k + 1) / T in [0, 1] (its learning rates and clip window are in those units),
  s = 1 the first training timestep k = T - 1, s = 0 the package samplers' end state (k = -1, alpha_bar = 1). The
  sampler is the package's solver re-implemented in continuous time (``continuous.sample``: "ddim", "dpmpp" or
  "unipc", the last UniPC-2 bh2 with its corrector as diffusers' ``UniPCMultistepScheduler``). The learned grid is
  then rounded to integer timesteps for the package schedulers (their custom ``timesteps=``), the decoupled times
  kept as the tau table; :func:`round_grid` reports how much the rounding moved the grid (the package's UniPC
  scheduler takes a custom ``timesteps=`` on a VP schedule; diffusers' own does not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .continuous import ContinuousSchedule, round_descending, sample


def ld3_times(xi: torch.Tensor, eta: torch.Tensor, t_max: float, t_min: float, win_rate: float = 0.5):
    """(times [t_K..t_0], model times [tau_K..tau_0]) from the parameters: LD3's ``time`` parameterisation."""
    plus = torch.softmax(xi, dim=0)
    md = torch.cumsum(plus, dim=0).flip(0)
    normed = (md - md[-1]) / (md[0] - md[-1])
    times = normed * (t_max - t_min) + t_min
    gaps = (times.detach()[1:] - times.detach()[:-1]).abs()
    max_move = float(gaps.min()) * win_rate
    mask = torch.ones_like(times)
    mask[0] = 0.0
    mask[-1] = 0.0
    return times, times + eta.clamp(-max_move, max_move) * mask


@dataclass
class LD3Config:
    num_train: int = 50
    num_valid: int = 50
    batch_size: int = 2
    rounds_v1: int = 2
    rounds_v2: int = 5
    lr_time_1: float = 5e-3
    lr_time_2: float = 0.1  # divided by K, as the repository does
    momentum_time_1: float = 0.9
    win_rate: float = 0.5
    patience: int = 5
    lr2_patience: int = 5
    lr_decay: float = 0.8
    min_lr_time_1: float = 5e-5
    min_lr_time_2: float = 1e-6
    shift_lr: Optional[float] = None  # default 12 / K
    prior_bound: Optional[float] = None  # default 0.001 * pixels / K^2
    max_seconds: Optional[float] = None  # stop early (reported) when a time budget is spent


@dataclass
class LD3Result:
    times: List[float]
    taus: List[float]
    valid_loss: float
    valid_loss_init: float
    forward_samples: int  # sample-evaluations of the network (one sample through the network once)
    backward_samples: int
    seconds: float
    iterations: int
    stopped_early: bool
    log: List[Dict] = field(default_factory=list)


class _Counter:
    def __init__(self, model):
        self.model, self.forward, self.backward_pending = model, 0, 0

    def __call__(self, x, tau):
        self.forward += x.shape[0]
        if torch.is_grad_enabled():
            self.backward_pending += x.shape[0]
        return self.model(x, tau)


def train_ld3(cond_model: Callable, x_train: torch.Tensor, y_train: torch.Tensor,
              x_valid: torch.Tensor, y_valid: torch.Tensor, nfe: int, solver: str, schedule: ContinuousSchedule,
              config: LD3Config, labels_train=None, labels_valid=None) -> LD3Result:
    """Train LD3's grid and decoupled time for `nfe` steps of `solver` (one of ``continuous.SOLVERS``: "ddim",
    "dpmpp", "unipc") against the teacher targets y.

    `cond_model(labels)` returns a model ``(x, tau) -> eps`` for those class labels (None for unconditional ones).
    """
    t0 = time.perf_counter()
    K = nfe
    # LD3 works in continuous VP time s in [0, 1] (its learning rates and clip window are in those units):
    # s = (k + 1) / T maps the diffusers timestep k, s = 0 the end state k = -1, s = 1 the first timestep T - 1
    T = float(schedule.T)

    def ld3_timesteps():
        s_times, s_taus = ld3_times(xi, eta, 1.0, 0.0, config.win_rate)
        return s_times * T - 1.0, s_taus * T - 1.0
    pixels = x_train[0].numel()
    shift_lr = config.shift_lr if config.shift_lr is not None else 12.0 / K
    prior_bound = config.prior_bound if config.prior_bound is not None else 0.001 * pixels / K ** 2
    xi = torch.nn.Parameter(torch.ones(K + 1, dtype=torch.float64))
    eta = torch.nn.Parameter(torch.zeros(K + 1, dtype=torch.float64))
    opt1 = torch.optim.RMSprop([xi], lr=config.lr_time_1, momentum=config.momentum_time_1)
    opt2 = torch.optim.SGD([eta], lr=config.lr_time_2 / K)
    forward = backward = 0

    def solve(x, labels, train_params: bool):
        nonlocal forward
        counter = _Counter(cond_model(labels))
        with torch.set_grad_enabled(train_params or x.requires_grad):
            times, taus = ld3_timesteps()
            if not train_params:
                times, taus = times.detach(), taus.detach()
            out = sample(counter, x, times, taus[:-1], solver, schedule)
        forward += counter.forward
        return out, counter.backward_pending

    def per_sample_loss(out, target):
        return (out - target).pow(2).flatten(1).mean(dim=1)

    def validate():
        losses = []
        with torch.no_grad():
            for s in range(0, x_valid_cur.shape[0], 64):
                lab = None if labels_valid is None else labels_valid[s:s + 64]
                out, _ = solve(x_valid_cur[s:s + 64], lab, False)
                losses.append(per_sample_loss(out, y_valid[s:s + 64]))
        return float(torch.cat(losses).mean())

    x_train_orig, x_valid_orig = x_train.clone(), x_valid.clone()
    x_train_cur, x_valid_cur = x_train.clone(), x_valid.clone()
    best = {"loss": validate(), "xi": xi.detach().clone(), "eta": eta.detach().clone(),
            "x_train": x_train_cur.clone(), "x_valid": x_valid_cur.clone()}
    init_loss = best["loss"]
    count_worse = count_min_lr2 = iterations = 0
    stopped_early = False
    log = [{"iter": 0, "valid_loss": init_loss}]
    gen = torch.Generator().manual_seed(0)

    def shift_latents(x_cur, x_orig, labels, targets, idx, step_params: bool):
        """One LD3 update on the batch `idx`: gradient step on the parameters (training only) and the latents."""
        nonlocal backward
        lat = x_cur[idx].clone().requires_grad_(True)
        lab = None if labels is None else labels[idx]
        out, pending = solve(lat, lab, step_params)
        vec = per_sample_loss(out, targets[idx])
        vec.mean().backward()
        backward += pending
        with torch.no_grad():
            moved = lat - shift_lr * lat.grad
            diff = (moved - x_orig[idx]).flatten(1)
            norm = diff.norm(dim=1)
            over = norm > prior_bound
            if over.any():
                diff[over] = diff[over] * (prior_bound / norm[over]).unsqueeze(1)
            moved = x_orig[idx] + diff.view_as(moved)
        if step_params:
            torch.nn.utils.clip_grad_norm_([xi], 1.0)
            torch.nn.utils.clip_grad_norm_([eta], 1.0)
            opt1.step()
            opt2.step()
        opt1.zero_grad(set_to_none=True)
        opt2.zero_grad(set_to_none=True)
        with torch.no_grad():
            out2, _ = solve(moved, lab, False)
            better = per_sample_loss(out2, targets[idx]) < vec.detach()
            x_cur[idx[better]] = moved[better].to(x_cur.dtype)
        return float(vec.detach().mean())

    def out_of_time():
        return config.max_seconds is not None and time.perf_counter() - t0 > config.max_seconds

    total_rounds = config.rounds_v1 + config.rounds_v2
    eval_on_one = True
    for rnd in range(total_rounds):
        if out_of_time():
            stopped_early = True
            break
        v2 = rnd >= config.rounds_v1
        eta.requires_grad_(v2)
        if rnd > 0:  # each round restarts from the best parameters and latents so far
            xi.data.copy_(best["xi"])
            eta.data.copy_(best["eta"])
            x_train_cur, x_valid_cur = best["x_train"].clone(), best["x_valid"].clone()
        order = torch.randperm(x_train_cur.shape[0], generator=gen)
        for s in range(0, order.numel(), config.batch_size):
            idx = order[s:s + config.batch_size]
            train_loss = shift_latents(x_train_cur, x_train_orig, labels_train, y_train, idx, True)
            iterations += 1
            loss = validate()
            log.append({"iter": iterations, "round": rnd, "train_loss": train_loss, "valid_loss": loss})
            if loss < best["loss"]:
                best = {"loss": loss, "xi": xi.detach().clone(), "eta": eta.detach().clone(),
                        "x_train": x_train_cur.clone(), "x_valid": x_valid_cur.clone()}
                count_worse = 0
            else:
                count_worse += 1
            if count_worse >= config.patience:
                xi.data.copy_(best["xi"])
                eta.data.copy_(best["eta"])
                count_worse = 0
                if eval_on_one:  # the repository's first plateau only widens its validation; ours is whole already
                    eval_on_one = False
                else:
                    for g in opt1.param_groups:
                        g["lr"] = max(g["lr"] * config.lr_decay, config.min_lr_time_1)
                    if v2:
                        for g in opt2.param_groups:
                            g["lr"] = max(g["lr"] * config.lr_decay, config.min_lr_time_2)
                            if g["lr"] <= config.min_lr_time_2:
                                count_min_lr2 += 1
            if count_min_lr2 >= config.lr2_patience or out_of_time():
                stopped_early = out_of_time()
                break
        else:
            # soft teacher forcing on the validation latents too, as the repository does (no parameter update)
            for s in range(0, x_valid_cur.shape[0], config.batch_size):
                idx = torch.arange(s, min(s + config.batch_size, x_valid_cur.shape[0]))
                shift_latents(x_valid_cur, x_valid_orig, labels_valid, y_valid, idx, False)
            continue
        break
    with torch.no_grad():
        xi.data.copy_(best["xi"])
        eta.data.copy_(best["eta"])
        times, taus = ld3_timesteps()
    return LD3Result(times=[float(t) for t in times], taus=[float(t) for t in taus[:-1]], valid_loss=best["loss"],
                     valid_loss_init=init_loss, forward_samples=forward, backward_samples=backward,
                     seconds=time.perf_counter() - t0, iterations=iterations, stopped_early=stopped_early, log=log)


def round_grid(times: List[float], num_train_timesteps: int = 1000) -> Dict:
    """Integer grid [t_K..t_1] for the package schedulers from LD3's continuous times [t_K..t_0 = -1].

    Rounds to the nearest timestep, then pushes apart any that collide (``continuous.round_descending``).
    Returns the grid and the largest / mean absolute change."""
    cont = times[:-1]
    grid = round_descending(cont, num_train_timesteps)
    moves = [abs(g - t) for g, t in zip(grid, cont)]
    return {"grid": grid, "max_abs_change": max(moves), "mean_abs_change": sum(moves) / len(moves)}


__all__ = ["LD3Config", "LD3Result", "ld3_times", "train_ld3", "round_grid"]
