"""The training loop shared by the bundled testbed networks (`testbeds.{mnist,mnist_flow,fashion}.train`).

Each script supplies what differs (architecture, data, loss, sampler, provenance text); this module runs the rest:
seeded batches with label dropout to the null class, AdamW with linear warm-up, gradient clipping, EMA weights, a
running loss, the wall-clock / step budget, optional periodic checkpoints and a stop file, and the grid / log /
checksum helpers of the saved folder. The order of the random draws is part of the contract: the bundled weights
were trained with it (batch indices, then the dropout mask, then whatever `loss_fn` draws, per step).
"""
import argparse
import contextlib
import copy
import hashlib
import math
import os
import platform
import shlex
import time
from typing import Callable, Optional

import torch

NULL_CLASS = 10


def parse_training_args(description: str, argv=None, *, max_minutes: float, grid_sampler: str, checkpoints: bool,
                        add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """The command line the training scripts share; ``checkpoints`` adds --save_every_minutes and --stop_file,
    ``add_arguments(parser)`` a script's own options (its data folder, mixed precision)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--output_dir", required=True)
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=100_000)
    p.add_argument("--max_minutes", type=float, default=max_minutes, help="wall-clock budget for the training loop")
    if checkpoints:
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
    p.add_argument("--grid_steps", type=int, default=100, help=f"{grid_sampler} steps for grid.png")
    args = p.parse_args(argv)
    if checkpoints:
        if args.max_minutes <= 0 or args.max_steps <= 0 or args.batch_size <= 0 or args.save_every_minutes <= 0:
            p.error("--max_minutes, --max_steps, --batch_size and --save_every_minutes must be positive")
    elif args.max_minutes <= 0 or args.max_steps <= 0 or args.batch_size <= 0:
        p.error("--max_minutes, --max_steps and --batch_size must be positive")
    if not 0.0 <= args.label_dropout < 1.0:
        p.error("--label_dropout must be in [0, 1)")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


def train_loop(
    args,
    make_unet: Callable[[], torch.nn.Module],
    load_data: Callable[[], tuple],
    loss_fn: Callable,
    data_note: str,
    log=print,
    write_checkpoint: Optional[Callable[[torch.nn.Module], None]] = None,
) -> tuple:
    """Train ``make_unet()`` on ``load_data()`` (images, labels) with ``loss_fn(unet, x0, labels, generator)``.

    ``args`` holds the common settings (seed, threads, device, max_steps, max_minutes, batch_size, lr, warmup_steps,
    weight_decay, ema_decay, label_dropout, log_every; ``stop_file`` and ``save_every_minutes`` where the script has
    them). ``data_note`` closes the first log line, ``{n}`` standing for the number of training images.
    ``write_checkpoint(ema)`` is called every ``args.save_every_minutes``. Returns (EMA unet on CPU float32, stats).
    """
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images, labels = load_data()
    images, labels = images.to(device), labels.to(device)
    n = images.shape[0]

    unet = make_unet().to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"device {device} | {hardware(device)} | params {n_params} | " + data_note.format(n=n))

    stop_file = getattr(args, "stop_file", None)
    start, step, running, last_save = time.time(), 0, None, time.time()
    while step < args.max_steps and (time.time() - start) < 60.0 * args.max_minutes:
        if stop_file and os.path.exists(stop_file):
            log(f"stop file {stop_file} found: ending training at step {step}")
            break
        idx = torch.randint(0, n, (args.batch_size,), device=device, generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(y.shape, device=device, generator=gen) < args.label_dropout] = NULL_CLASS
        loss = loss_fn(unet, x0, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, unet, min(args.ema_decay, (1 + step) / (10 + step)))
        step += 1
        lv = loss.item() if step % 50 == 0 or step == 1 else None
        if lv is not None:
            running = lv if running is None else 0.9 * running + 0.1 * lv
        if step % args.log_every == 0:
            log(f"step {step} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} elapsed {time.time() - start:.0f}s")
        if write_checkpoint is not None and time.time() - last_save > 60.0 * args.save_every_minutes:
            write_checkpoint(ema.float().cpu() if device.type != "cpu" else ema)
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
        "hardware": hardware(device),
        "params": n_params,
        "batch_size": args.batch_size,
    }
    return ema.float().cpu(), stats


def sample_grid(pipe, args, path: str) -> None:
    """10 samples per class (rows 0..9) with ``args.grid_steps`` steps, seeded by ``args.seed``, saved as a PNG."""
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(10)
    grid = pipe(
        class_labels=labels, num_inference_steps=args.grid_steps, generator=torch.Generator().manual_seed(args.seed)
    ).images
    save_grid(grid, path)


def save_grid(images: torch.Tensor, path: str) -> None:
    from PIL import Image

    n = images.shape[0]
    rows = int(math.sqrt(n))
    cols = math.ceil(n / rows)
    h, w = images.shape[-2:]
    canvas = torch.zeros(rows * h, cols * w)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i, 0].cpu()
    Image.fromarray((canvas.numpy() * 255).round().astype("uint8"), mode="L").save(path)


def command_line(module: str, argv) -> str:
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in argv)


def weights_sha256(model_dir: str) -> str:
    """SHA-256 of ``unet/diffusion_pytorch_model.safetensors`` (recorded in PROVENANCE.md, checked by the tests)."""
    with open(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@contextlib.contextmanager
def tee_log(output_dir: str):
    """A ``log(msg)`` that prints and appends to ``output_dir/train_log.txt`` (flushed at every line)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "train_log.txt"), "a") as logf:

        def log(msg):
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        yield log
