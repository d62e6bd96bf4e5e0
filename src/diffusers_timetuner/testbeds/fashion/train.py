"""Train the bundled class-conditional Fashion-MNIST `UNet2DModel` (16x16, label 10 = null class for guidance).

Data: the 60000 Fashion-MNIST training images (Debian `dataset-fashion-mnist`, `testbeds.data.load_fashion_mnist`),
area-downsampled 28 -> 16; the 10000 test images are the FID reference and are never trained on. Objective and
sampler as the eps MNIST testbed (`testbeds.mnist.train`): epsilon prediction under linear betas 1e-4..2e-2 over
1000 steps, DDIMScheduler with clip_sample=False. Labels are replaced by the null class with probability
`--label_dropout`. AdamW with linear warm-up; EMA weights are saved (also every `--save_every_minutes`, so a run can
be stopped early and still leave a usable model). Stops at `--max_steps` or after `--max_minutes`.

16x16 rather than 28x28: on the shared 2-core CPU a 28x28 network of this width takes 3-5x longer per batch
(measured side by side), which would leave it far under-trained in the same wall time.

Writes to --output_dir: ``unet/`` (safetensors + config, EMA weights, float32), ``scheduler/``, ``grid.png``
(10x10 samples, one row per class, 100 DDIM steps), ``train_log.txt`` and ``PROVENANCE.md``.

Example:
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m diffusers_timetuner.testbeds.fashion.train \
        --output_dir /tmp/fashion --max_minutes 60 --threads 1
"""
import copy
import json
import os
import sys

from diffusers import UNet2DModel

from ..mnist.train import epsilon_loss, train_alphas_cumprod
from ..mnist.train import make_scheduler  # noqa: F401  (the same DDIM sampler as the eps MNIST testbed)
# The flow MNIST testbed's network: 16 -> 8 -> 4, channels (16, 32, 32), one ResNet layer per block, attention at
# 8x8; 281k parameters, sized for a shared CPU.
from ..mnist_flow.train import SAMPLE_SIZE, make_unet
from ..training import (
    command_line,
    parse_training_args,
    resolve_device,
    sample_grid,
    tee_log,
    train_loop,
    weights_sha256,
)

def parse_args(argv=None):
    def data_dir(p):
        p.add_argument("--data_dir", default=None, help="folder of the Fashion-MNIST .gz files (default: Debian's)")

    return parse_training_args(__doc__.split("\n")[0], argv, max_minutes=60.0, grid_sampler="DDIM", checkpoints=True,
                               add_arguments=data_dir)


def _write_weights(ema, output_dir):
    ema.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
    make_scheduler().save_pretrained(os.path.join(output_dir, "scheduler"))


def train(args, log=print):
    """Run the training loop; returns (ema_unet on CPU float32, stats dict)."""
    from ..data import FASHION_MNIST_DIR, downsample, load_fashion_mnist

    def load_data():
        images, labels = load_fashion_mnist("train", args.data_dir or FASHION_MNIST_DIR)
        return downsample(images, SAMPLE_SIZE), labels

    loss_fn = epsilon_loss(train_alphas_cumprod(resolve_device(args.device)))
    return train_loop(
        args, make_unet, load_data, loss_fn, f"train images {{n}} at {SAMPLE_SIZE}x{SAMPLE_SIZE}", log,
        write_checkpoint=lambda ema: _write_weights(ema, args.output_dir),
    )


def save(unet: UNet2DModel, stats: dict, args, argv) -> None:
    """Write unet/ (float32), scheduler/, grid.png and PROVENANCE.md (weights first, provenance last)."""
    from ..pipeline import ClassConditionalImagePipeline

    os.makedirs(args.output_dir, exist_ok=True)
    _write_weights(unet, args.output_dir)
    pipe = ClassConditionalImagePipeline(unet=copy.deepcopy(unet), scheduler=make_scheduler())
    sample_grid(pipe, args, os.path.join(args.output_dir, "grid.png"))
    command = command_line("diffusers_timetuner.testbeds.fashion.train", argv)
    with open(os.path.join(args.output_dir, "PROVENANCE.md"), "w") as f:
        f.write(
            "# Bundled Fashion-MNIST UNet: provenance\n\n"
            f"- command: `{command}`\n"
            f"- seed: {args.seed}; training steps: {stats['steps']} (batch {stats['batch_size']}, "
            f"lr {args.lr}, warm-up {args.warmup_steps}, EMA {args.ema_decay}, label dropout {args.label_dropout})\n"
            "- objective: epsilon prediction, linear betas 1e-4..2e-2 over 1000 steps; sampler DDIMScheduler "
            "(clip_sample=False)\n"
            f"- final training loss (running mean of the MSE on eps): {stats['final_loss']:.4f}\n"
            f"- training wall time: {stats['wall_seconds']:.0f} s on {stats['hardware']}\n"
            f"- parameters: {stats['params']}; data: the 60000 Fashion-MNIST training images (Debian "
            f"dataset-fashion-mnist), area-downsampled to {SAMPLE_SIZE}x{SAMPLE_SIZE}\n"
            f"- grid.png: 10 samples per class (rows 0..9), {args.grid_steps} DDIM steps, no guidance\n"
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
