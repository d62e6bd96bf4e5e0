#!/usr/bin/env python
"""Calibrate TimeTuner tau tables for a Diffusers model (one CPU, one GPU or many through Accelerate).

    timetuner-calibrate                                   # bundled MNIST model, DDIM, 10 steps
    python -m diffusers_timetuner.cli.calibrate --num_inference_steps 10 20 --scheduler dpmsolver
    accelerate launch examples/calibrate.py --output_dir mnist-ddim-10

Writes ``scheduler_config.json`` (load it with ``TimeTuner*Scheduler.from_pretrained(output_dir)``), ``report.json``
and ``calibration.png`` to ``--output_dir`` (main process only), checkpoints after every step to
``<output_dir>/checkpoints`` (``--resume_from_checkpoint`` continues from there).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import shutil
import sys
from typing import List, Optional

import torch

OUTPUT_FILES = ("scheduler_config.json", "report.json", "calibration.png")
CHECKPOINT_SUBDIR = "checkpoints"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from ..calibration.api import DEFAULT_OBJECTIVE, DEFAULT_OPTIMIZER
    from ..calibration.objectives import OBJECTIVES
    from ..calibration.optimizers import OPTIMIZERS
    from ..calibration.strategies import STRATEGIES

    p = argparse.ArgumentParser(description="Calibrate TimeTuner tau tables (Xia et al., CVPR 2024).")
    p.add_argument("--pretrained_model_name_or_path", default=None,  # None / "mnist" / "gmm": bundled testbeds
                   help="Diffusers pipeline folder or Hub id (default: the bundled class-conditional MNIST model).")
    p.add_argument("--scheduler", default="ddim",
                   help="ddim, ddpm, dpmsolver, dpmsolver_singlestep, euler, or a (TimeTuner) scheduler class name; "
                        "built from the model's scheduler config.")
    p.add_argument("--num_inference_steps", type=int, nargs="+", default=None,
                   help="One or more step counts (default 10, or the length of --timesteps).")
    p.add_argument("--timesteps", type=int, nargs="+", default=None,
                   help="A custom grid t_K > ... > t_1 (descending integers) to calibrate one table on; sample "
                        "with pipe(..., timesteps=<the same grid>).")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="Default: sequential with --data_dir, else data_free.")
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER)
    p.add_argument("--adam_steps", type=int, default=500, help="Adam mini-batches per step (reference: 500).")
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--labels", type=int, nargs="+", default=None, help="Class labels to calibrate on (cycled).")
    p.add_argument("--prompts_file", default=None, help="Text file, one prompt per line (text-to-image pipelines).")
    p.add_argument("--negative_prompt", default="", help="Negative prompt for guidance with prompts.")
    p.add_argument("--data_dir", default=None,
                   help="Images for the data-based strategies: a folder of images, a .pt/.npy/.npz array "
                        "(N, C, H, W) in the model's input range, or 'mnist' (the bundled MNIST digits).")
    # Defaults sized for the no-argument run (bundled MNIST, DDIM 10) to take a few minutes on 2 CPU cores;
    # raise them on a GPU.
    p.add_argument("--num_samples", type=int, default=32, help="Calibration samples.")
    p.add_argument("--batch_size", type=int, default=32, help="Samples per network call and process.")
    p.add_argument("--num_heldout_samples", type=int, default=32, help="Held-out x_T the report is computed on.")
    p.add_argument("--num_validation_samples", type=int, default=16, help="Samples of the step guard.")
    p.add_argument("--no_guard", action="store_true",
                   help="Ship the full tuned table even if a shorter prefix (or none) is better on validation.")
    p.add_argument("--guard_margin", type=float, default=2.0,
                   help="Keep tuned steps only if they beat untuned on validation by more than this many standard "
                        "errors (0: any improvement).")
    p.add_argument("--validation_metric", default="auto", choices=["auto", "endpoint_mse", "energy_distance"],
                   help="What the guard and the held-out verdict compare (auto: energy distance for stochastic "
                        "samplers such as DDPM, endpoint MSE otherwise).")
    p.add_argument("--teacher_steps", type=int, default=None,
                   help="Teacher step count (default about 5 n; more is a more accurate reference).")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="timetuner-calibration")
    p.add_argument("--overwrite_output_dir", action="store_true")
    p.add_argument("--resume_from_checkpoint", nargs="?", const="latest", default=None,
                   help="Continue from <output_dir>/checkpoints ('latest', the default) or a checkpoint folder.")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_private", action="store_true")
    p.add_argument("--cpu", action="store_true", help="Run on CPU even if a GPU is available.")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    args.command = "timetuner-calibrate " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    return args


def main(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.logging import get_logger

    from ..calibration import calibrate

    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    level = logging.INFO if accelerator.is_main_process else logging.ERROR
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=level, force=True)
    logging.getLogger("diffusers_timetuner").setLevel(level)  # the library's per-step lines and warnings
    logger = get_logger(__name__)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/mnist-ddim-timetuner).")
        from ..hub import check_can_push

        check_can_push(args.hub_model_id)  # repo id + login, before minutes of calibration
    checkpoint_dir = _prepare_output_dir(args, accelerator)

    pipeline, model_id = load_model(args.pretrained_model_name_or_path)
    conditions, negative = _conditions(args)
    data = load_data(args.data_dir) if args.data_dir else None
    logger.info(
        f"timetuner-calibrate on {accelerator.num_processes} process(es), device {accelerator.device} "
        f"({accelerator.distributed_type}); model {model_id}; scheduler {args.scheduler}; steps "
        f"{args.timesteps or args.num_inference_steps or [10]}; objective {args.objective}; "
        f"optimizer {args.optimizer}; "
        f"strategy {args.strategy or ('sequential' if data is not None else 'data_free')}; "
        f"guidance {args.guidance_scale}; {args.num_samples} samples", main_process_only=True)

    optimizer_kwargs = {"num_steps": args.adam_steps} if args.optimizer == "adam" else {}
    result = calibrate(
        pipeline, args.scheduler, args.num_inference_steps, timesteps=args.timesteps, objective=args.objective,
        strategy=args.strategy,
        optimizer=args.optimizer, optimizer_kwargs=optimizer_kwargs, guidance_scale=args.guidance_scale,
        conditions=conditions, negative_conditions=negative, data=data, num_samples=args.num_samples,
        batch_size=args.batch_size, num_validation_samples=args.num_validation_samples,
        num_heldout_samples=args.num_heldout_samples, teacher_steps=args.teacher_steps, guard=not args.no_guard,
        validation_metric=args.validation_metric, guard_margin=args.guard_margin,
        eta=args.eta, seed=args.seed, accelerator=accelerator, checkpoint_dir=checkpoint_dir,
        progress=not args.no_progress, model_id=model_id,
    )
    if accelerator.is_main_process:
        result.save(args.output_dir, extra={"command": args.command, "versions": versions(),
                                            "num_processes": accelerator.num_processes})
        for n, rep in sorted(result.reports.items()):
            h = rep.heldout
            logger.info(f"n={n}: taus {[round(t, 2) for t in rep.taus]}; held-out {h['metric']} "
                        f"{h['untuned']:.5g} -> {h['tuned']:.5g} "
                        f"({100 * h['relative_change']:+.1f}%); {rep.forward_samples} forward samples, "
                        f"{rep.seconds:.1f} s")
        # the run finished: its per-step checkpoints are no longer needed
        shutil.rmtree(os.path.join(args.output_dir, CHECKPOINT_SUBDIR), ignore_errors=True)
        logger.info(f"wrote {', '.join(OUTPUT_FILES)} to {os.path.abspath(args.output_dir)}")
        if args.push_to_hub:
            from ..hub import push_tuned_schedule

            # base_model is inferred from the recorded model id (local paths and bundled testbeds are skipped).
            push_tuned_schedule(args.output_dir, args.hub_model_id, private=args.hub_private,
                                commit_message=f"TimeTuner tables for {sorted(result.reports)} steps")
            logger.info(f"pushed to {args.hub_model_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _prepare_output_dir(args, accelerator) -> str:
    """Refuse an output dir holding another run unless resuming or overwriting; returns the checkpoint dir."""
    out = args.output_dir
    checkpoint_dir = os.path.join(out, CHECKPOINT_SUBDIR)
    if args.resume_from_checkpoint not in (None, "latest"):
        checkpoint_dir = args.resume_from_checkpoint
        if not os.path.isdir(checkpoint_dir):
            raise ValueError(f"--resume_from_checkpoint {checkpoint_dir} is not a folder.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out} is a file; pass a folder path (it is created if missing).")
    ours = OUTPUT_FILES + (CHECKPOINT_SUBDIR,)
    occupied = os.path.isdir(out) and any(os.path.exists(os.path.join(out, f)) for f in ours)
    if occupied and args.resume_from_checkpoint is None:
        if not args.overwrite_output_dir:
            raise ValueError(
                f"--output_dir {out} already holds a calibration run. Pass --overwrite_output_dir to replace it, "
                "--resume_from_checkpoint to continue it, or choose another --output_dir."
            )
        # the old result stays until the new one replaces it whole (CalibrationResult.save writes atomically);
        # only the old run's checkpoints go, so that this run cannot pick them up
        if accelerator.is_main_process:
            shutil.rmtree(os.path.join(out, CHECKPOINT_SUBDIR), ignore_errors=True)
    accelerator.wait_for_everyone()
    return checkpoint_dir


def load_model(path: Optional[str]):
    """(pipeline, model id) for a pipeline folder / Hub id, or a bundled testbed: the MNIST UNet when ``path`` is
    None, ``mnist`` or its id; the exact-score mixture for ``gmm`` or its id."""
    from .. import testbeds

    if path in (None, "mnist", testbeds.MNIST_MODEL_ID):
        return testbeds.load_mnist_pipeline(), testbeds.MNIST_MODEL_ID
    if path in ("gmm", testbeds.GMM_MODEL_ID):
        return testbeds.load_gmm_pipeline(), testbeds.GMM_MODEL_ID
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path), path


def load_data(source: str):
    """Images (and labels where the source has them) for the data-based strategies."""
    if source == "mnist":
        from ..testbeds.data import load_mnist

        return load_mnist("train")
    if os.path.isfile(source):
        if source.endswith(".pt"):
            import pickle

            try:  # tensors only: a pickle with code in it must not run (torch < 2.6 defaults to weights_only=False)
                obj = torch.load(source, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise ValueError(
                    f"--data_dir {source} holds more than tensors (refused to run the pickled code it contains: "
                    f"{str(err).splitlines()[0]}). Save a tensor or a dict of tensors {{'images': ..., 'labels': ...}} "
                    "with torch.save."
                ) from None
            return (obj["images"], obj.get("labels")) if isinstance(obj, dict) else obj
        import numpy as np

        arr = np.load(source)
        if source.endswith(".npz"):
            images = torch.from_numpy(arr["images"]).float()
            return (images, torch.from_numpy(arr["labels"])) if "labels" in arr else images
        return torch.from_numpy(arr).float()
    if os.path.isdir(source):
        return _load_image_folder(source)
    raise ValueError(f"--data_dir {source!r} is neither 'mnist', an array file (.pt/.npy/.npz) nor a folder.")


def _load_image_folder(folder: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
    if not files:
        raise ValueError(f"--data_dir {folder} holds no images (.png, .jpg, .jpeg, .bmp, .webp).")
    arrays = []
    for f in files:
        img = np.asarray(Image.open(os.path.join(folder, f)), dtype=np.float32) / 127.5 - 1.0
        arrays.append(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


def _conditions(args):
    if args.prompts_file and args.labels:
        raise ValueError("Give --labels or --prompts_file, not both.")
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts_file {args.prompts_file} holds no prompt.")
        return prompts, args.negative_prompt
    return args.labels, None


def versions() -> dict:
    import accelerate
    import diffusers

    from .. import __version__

    return {"diffusers_timetuner": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def cli() -> None:
    """Console script ``timetuner-calibrate``."""
    main(parse_args())


if __name__ == "__main__":
    cli()
