#!/usr/bin/env python
# Copyright 2026 The diffusers-timetuner developers. Licensed under the Apache License, Version 2.0.
"""Generate images with and without a TimeTuner table, same seeds, and save them side by side.

########################################################################
# This is a fully working example of swapping a tuned schedule into a
# diffusers pipeline:
# - the pipeline: the bundled MNIST model (default), a local folder or a Hub id
# - the tuned schedule: a bundled entry name, a calibration output folder,
#   or a Hub repo holding `scheduler/scheduler_config.json`
# - the untuned baseline: the SAME scheduler class and grid, without the table
#
# Example:
#   python examples/generate.py --schedule <bundled-name | folder | ORG/NAME> --output compare.png
########################################################################
"""
import argparse
import inspect
import os

import torch
from PIL import Image, ImageDraw

from diffusers_timetuner.calibration.families import untuned_copy  # same config and grid, no table
from diffusers_timetuner.hub import list_bundled_schedules, load_tuned_scheduler


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Untuned vs TimeTuner-tuned samples, same seeds, one PNG.")
    parser.add_argument("--pipeline", default="mnist",
                        help="'mnist' (bundled class-conditional MNIST model), a pipeline folder or a Hub id.")
    parser.add_argument("--schedule", required=True,
                        help=f"tuned schedule: bundled name ({', '.join(list_bundled_schedules()) or 'none yet'}), "
                             "a folder, or a Hub repo id.")
    parser.add_argument("--subfolder", default="scheduler", help="where the scheduler config sits in the repo.")
    parser.add_argument("--revision", default=None, help="Hub branch / tag / commit of the schedule.")
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help="default: the smallest step count the table has.")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="default: the one the table was tuned with (a table is only valid for its scale).")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="image k uses seed + k in both columns.")
    parser.add_argument("--prompt", default="a photo of a cat", help="for text-to-image pipelines.")
    parser.add_argument("--no_check_model_id", action="store_true",
                        help="skip the recorded-model-id check (same weights loaded under another name).")
    parser.add_argument("--output", default="timetuner_compare.png")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args(argv)
    if args.num_images < 1:
        parser.error("--num_images must be >= 1")
    return args


def load_pipeline(name: str):
    if name == "mnist":
        from diffusers_timetuner.testbeds import load_mnist_pipeline

        return load_mnist_pipeline()
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(name)


def generate(pipe, scheduler, args, num_inference_steps: int, guidance_scale):
    """One image per seed (seed + k), so the tuned and untuned columns start from the same noise."""
    pipe.scheduler = scheduler  # assign after construction: some pipelines convert schedulers in __init__
    params = inspect.signature(pipe.__call__).parameters
    images = []
    for k in range(args.num_images):
        kwargs = {"num_inference_steps": num_inference_steps, "output_type": "pil",
                  "generator": torch.Generator().manual_seed(args.seed + k)}
        if "class_labels" in params:
            kwargs["class_labels"] = [k % 10]
        elif "prompt" in params:
            kwargs["prompt"] = args.prompt
        else:
            kwargs["batch_size"] = 1
        if guidance_scale is not None and "guidance_scale" in params:
            kwargs["guidance_scale"] = guidance_scale
        if "eta" in params:
            kwargs["eta"] = 0.0
        images.append(pipe(**kwargs).images[0])
    return images


def side_by_side(untuned, tuned, labels=("untuned", "TimeTuner"), columns: int = 4) -> Image.Image:
    """Two image grids (up to `columns` per row), left untuned, right tuned; image k sits at the same place in both."""
    w, h = untuned[0].size
    scale = max(1, 64 // max(w, h))  # small images (MNIST 28x28) are upscaled for viewing
    w, h = w * scale, h * scale
    cols = min(columns, len(untuned))
    rows = -(-len(untuned) // cols)
    header, gap = 14, 8
    panel_w = cols * w
    canvas = Image.new("RGB", (2 * panel_w + gap, header + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    for side, (label, images) in enumerate(zip(labels, (untuned, tuned))):
        x0 = side * (panel_w + gap)
        draw.text((x0 + 2, 1), label, fill="black")
        for k, img in enumerate(images):
            canvas.paste(img.convert("RGB").resize((w, h), Image.NEAREST),
                         (x0 + (k % cols) * w, header + (k // cols) * h))
    return canvas


def main(args):
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    tuned = load_tuned_scheduler(args.schedule, subfolder=args.subfolder, revision=args.revision, pipeline=pipe,
                                 check_model_id=not args.no_check_model_id)
    steps = sorted(int(n) for n in tuned.config.tuned_timesteps)
    n = args.num_inference_steps or steps[0]
    info = (tuned.config.tuning_info or {}).get(str(n)) or {}
    guidance = args.guidance_scale if args.guidance_scale is not None else info.get("guidance_scale")

    untuned_images = generate(pipe, untuned_copy(tuned), args, n, guidance)
    tuned_images = generate(pipe, tuned, args, n, guidance)  # set_timesteps raises if the table lacks n
    canvas = side_by_side(untuned_images, tuned_images)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    canvas.save(args.output)
    print(f"{n} steps, guidance {guidance}: wrote {args.output} (left untuned, right tuned, same seeds)")
    return canvas


if __name__ == "__main__":
    main(parse_args())
