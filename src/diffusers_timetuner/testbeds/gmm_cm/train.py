"""Train the bundled consistency model of the digits mixture by consistency distillation from its exact ODE.

Teacher: the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma of the bundled 10-component mixture
(`testbeds.load_gmm_model`) in EDM's variance-exploding form x_sigma = x_0 + sigma eps. The mixture's denoiser
D(x, sigma) = E[x_0 | x_sigma = x] is exact (`exact_denoiser`), so one Heun step of the teacher between neighbouring
sigmas is exact up to the step's own truncation error. Consistency distillation (Song et al., 2023, Alg. 2): draw
x_0 from the mixture, a discretisation index n uniformly from 0 .. N - 2 of the Karras sigmas (N = 40, sigma in
[0.002, 80], rho 7: `CMStochasticIterativeScheduler`'s defaults), x_{n+1} = x_0 + sigma_{n+1} z, one teacher Heun step
to sigma_n, and regress f_theta(x_{n+1}, sigma_{n+1}) on the target network's f(x_n, sigma_n) (squared error; target
weights an EMA of the online weights, decay `--target_decay`). f is the EDM consistency parametrisation the
scheduler applies: f(x, sigma) = c_skip x + c_out F(x / sqrt(sigma^2 + sigma_data^2), 250 log sigma), with
c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2), c_out = (sigma - sigma_min) sigma_data /
sqrt(sigma^2 + sigma_data^2), sigma_data = 0.5, so f(x, sigma_min) = x.

The loop (batches, AdamW with warm-up, EMA of the sampling weights, budget, stop file) is `testbeds.training`'s;
the training set is 100 000 exact mixture samples drawn once from ``--seed`` (labels are unused).

Writes to --output_dir: ``unet/`` (`ConsistencyMLP`, EMA weights), ``scheduler/`` (CMStochasticIterativeScheduler,
``clip_denoised=False``: the mixture's samples slightly exceed [-1, 1]), ``eval.json`` (FD at 1, 2 and 4 steps
against exact mixture samples), ``grid.png``, ``train_log.txt`` and ``PROVENANCE.md``.

Example:
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m diffusers_timetuner.testbeds.gmm_cm.train \
        --output_dir /tmp/gmm_cm --max_minutes 20 --threads 1
"""
import copy
import json
import math
import os
import sys
import time

import torch
from diffusers import CMStochasticIterativeScheduler

from ..gmm import cached_decomposition
from ..training import command_line, parse_training_args, save_grid, tee_log, train_loop, weights_sha256
from .model import ConsistencyMLP

NUM_DISCRETISATION = 40  # N, CMStochasticIterativeScheduler's num_train_timesteps
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, RHO = 0.002, 80.0, 0.5, 7.0
TRAIN_SET = 100_000
EVAL_SAMPLES, EVAL_REFERENCE, EVAL_STEPS = 2000, 10000, (1, 2, 4)


def make_model() -> ConsistencyMLP:
    """Residual MLP, width 256, 4 blocks (about 0.6M parameters, 2.5 MB): minutes of training on a shared CPU core."""
    return ConsistencyMLP(sample_size=8, in_channels=1, hidden=256, depth=4, embed_dim=64)


def make_scheduler() -> CMStochasticIterativeScheduler:
    return CMStochasticIterativeScheduler(num_train_timesteps=NUM_DISCRETISATION, sigma_min=SIGMA_MIN,
                                          sigma_max=SIGMA_MAX, sigma_data=SIGMA_DATA, rho=RHO, clip_denoised=False)


def karras_sigmas(n: int = NUM_DISCRETISATION) -> torch.Tensor:
    """sigma_0 = sigma_min < ... < sigma_{N-1} = sigma_max (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = SIGMA_MIN ** (1 / RHO), SIGMA_MAX ** (1 / RHO)
    return (lo + ramp * (hi - lo)) ** RHO


def exact_denoiser(mixture, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x_0 | x_0 + sigma eps = x] of the mixture for flat x (B, D) and sigma (B,), float64.

    Per component, x ~ N(mu_k, S_k + sigma^2 I): in S_k's eigenbasis z = U_k^T (x - mu_k), var = lambda + sigma^2,
    E_k[x_0 | x] = mu_k + U_k (lambda / var) z, weighted by the posterior of k.
    """
    log_w, mu, u, lam = cached_decomposition(mixture)
    k, d, _ = u.shape
    var = lam[None] + (sigma * sigma)[:, None, None]  # (B, K, D)
    u_flat = u.permute(1, 0, 2).reshape(d, k * d)
    z = (x @ u_flat).view(-1, k, d) - torch.einsum("kd,kde->ke", mu, u)[None]
    resp = torch.softmax(log_w[None] - 0.5 * (var.log().sum(-1) + (z * z / var).sum(-1)), dim=1)
    shrunk = (resp[:, :, None] * lam[None] / var * z).reshape(-1, k * d) @ u_flat.T
    return shrunk + resp @ mu


def heun_step(mixture, x: torch.Tensor, s_from: torch.Tensor, s_to: torch.Tensor) -> torch.Tensor:
    """One Heun step of the exact probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (float64)."""
    d1 = (x - exact_denoiser(mixture, x, s_from)) / s_from[:, None]
    x_euler = x + (s_to - s_from)[:, None] * d1
    d2 = (x_euler - exact_denoiser(mixture, x_euler, s_to)) / s_to[:, None]
    return x + (s_to - s_from)[:, None] * (d1 + d2) / 2


def consistency_function(model, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """f(x, sigma) = c_skip x + c_out F(c_in x, 250 log sigma): the scheduler's scalings (float32, (B, 1, 8, 8))."""
    s = sigma.float()[:, None, None, None]
    c_skip = SIGMA_DATA ** 2 / ((s - SIGMA_MIN) ** 2 + SIGMA_DATA ** 2)
    c_out = (s - SIGMA_MIN) * SIGMA_DATA / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    c_in = 1.0 / (s ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip * x + c_out * model(c_in * x, 250.0 * torch.log(sigma.float())).sample


def distillation_loss(mixture, target_decay: float):
    """``loss_fn(model, x0, labels, generator)`` of consistency distillation, with its own EMA target network."""
    sigmas = karras_sigmas()
    state = {}

    def loss_fn(model, x0, labels, generator):
        if "target" not in state:
            state["target"] = copy.deepcopy(model).requires_grad_(False)
        target = state["target"]
        with torch.no_grad():  # the target follows the online weights of the previous step
            torch._foreach_lerp_(list(target.parameters()), list(model.parameters()), 1.0 - target_decay)
        b = x0.shape[0]
        n = torch.randint(0, NUM_DISCRETISATION - 1, (b,), device=x0.device, generator=generator)
        z = torch.randn(x0.shape, device=x0.device, generator=generator)
        s_hi, s_lo = sigmas[n + 1], sigmas[n]
        x_hi = x0.double() + s_hi[:, None, None, None] * z.double()
        with torch.no_grad():
            x_lo = heun_step(mixture, x_hi.reshape(b, -1), s_hi, s_lo).reshape(x0.shape).float()
            goal = consistency_function(target, x_lo, s_lo)
        pred = consistency_function(model, x_hi.float(), s_hi)
        return (pred - goal).pow(2).flatten(1).mean(1).mean()

    return loss_fn


def parse_args(argv=None):
    def extra(p):
        p.add_argument("--target_decay", type=float, default=0.95, help="EMA decay of the distillation target")

    return parse_training_args(__doc__.split("\n")[0], argv, max_minutes=20.0, grid_sampler="CM", checkpoints=True,
                               add_arguments=extra)


@torch.no_grad()
def evaluate(model, mixture, seed: int) -> dict:
    """FD (pixels) of EVAL_SAMPLES samples at 1, 2 and 4 CM steps against EVAL_REFERENCE exact mixture samples."""
    from ...denoiser import Denoiser
    from ...metrics import pixel_frechet_distance
    from ...sampling import sample

    exact = mixture.sample_data(EVAL_REFERENCE, torch.Generator().manual_seed(seed + 1))
    exact2 = mixture.sample_data(EVAL_SAMPLES, torch.Generator().manual_seed(seed + 2))
    noise = torch.randn((EVAL_SAMPLES, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    rows = []
    for steps in EVAL_STEPS:
        x = sample(Denoiser(model), make_scheduler(), noise, steps, generator=torch.Generator().manual_seed(seed + 3))
        rows.append({"steps": steps, "n_samples": EVAL_SAMPLES, "fd": float(pixel_frechet_distance(x, exact))})
    return {"seed": seed, "reference_samples": EVAL_REFERENCE,
            "fd_exact_vs_exact": float(pixel_frechet_distance(exact2, exact)), "rows": rows}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.label_dropout = 0.0  # unconditional: the labels are never read
    from .. import load_gmm_model

    mixture = load_gmm_model()
    out = args.output_dir

    def load_data():
        x = mixture.sample_data(TRAIN_SET, torch.Generator().manual_seed(args.seed))
        return x, torch.zeros(TRAIN_SET, dtype=torch.long)

    def write_checkpoint(ema):
        ema.save_pretrained(os.path.join(out, "unet"))

    with tee_log(out) as log:
        log(f"command: {command_line('diffusers_timetuner.testbeds.gmm_cm.train', argv)}")
        model, stats = train_loop(args, make_model, load_data, distillation_loss(mixture, args.target_decay),
                                  "consistency distillation from the exact mixture ODE, {n} exact samples", log=log,
                                  write_checkpoint=write_checkpoint)
        write_checkpoint(model)
        make_scheduler().save_pretrained(os.path.join(out, "scheduler"))
        tick = time.time()
        report = evaluate(model.eval(), mixture, args.seed)
        report["seconds"] = time.time() - tick
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(report, f, indent=1)
        log(f"eval: {json.dumps(report)}")
        from ...denoiser import Denoiser
        from ...sampling import sample

        grid = sample(Denoiser(model), make_scheduler(), torch.randn((100, 1, 8, 8),
                      generator=torch.Generator().manual_seed(args.seed)), 1)
        save_grid(((grid + 1) / 2).clamp(0, 1), os.path.join(out, "grid.png"))
        write_provenance(out, args, argv, stats, report)


def write_provenance(out, args, argv, stats, report) -> None:
    fd = "\n".join(f"| {r['steps']} | {r['n_samples']} | {r['fd']:.4f} |" for r in report["rows"])
    text = f"""# Bundled consistency model of the digits mixture: provenance

- command: `{command_line('diffusers_timetuner.testbeds.gmm_cm.train', argv)}`
- seed: {args.seed}; training steps: {stats['steps']} (batch {args.batch_size}, lr {args.lr}, warm-up \
{args.warmup_steps}, sampling EMA {args.ema_decay}, target EMA {args.target_decay})
- method: consistency distillation (Song et al., 2023) from the exact probability-flow ODE of the bundled mixture
  (`testbeds/gmm_digits`), one Heun step of the exact ODE per pair of neighbouring Karras sigmas (N = \
{NUM_DISCRETISATION}, sigma {SIGMA_MIN} .. {SIGMA_MAX}, rho {RHO}), squared-error distance, EMA target network
- parametrisation: `CMStochasticIterativeScheduler`'s (c_skip, c_out with sigma_data {SIGMA_DATA}, input scaled by
  1 / sqrt(sigma^2 + sigma_data^2), network timestep 250 log sigma); scheduler saved with `clip_denoised=False`
- final training loss (running mean): {stats['final_loss']:.5f}
- training wall time: {stats['wall_seconds']:.0f} s on {stats['hardware']}
- parameters: {stats['params']}; data: {TRAIN_SET} exact mixture samples drawn with the seed
- weights sha256: `{weights_sha256(out)}` (unet/diffusion_pytorch_model.safetensors)
- grid.png: 100 one-step samples (seed {args.seed}), mapped from [-1, 1] to [0, 1]

## Quality (`eval.json`: {EVAL_SAMPLES} samples from seeded x_T, pixel FD against {EVAL_REFERENCE} exact mixture \
samples; two exact sample sets: {report['fd_exact_vs_exact']:.4f})

| CM steps | samples | FD |
|---|---|---|
{fd}
"""
    with open(os.path.join(out, "PROVENANCE.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
