"""Quality figures of a class-conditional MNIST pipeline: classifier accuracy and FD-MNIST per (steps, guidance).

Example (writes eval.json and appends a table to PROVENANCE.md in --model_dir):
    PYTHONPATH=src python -m diffusers_timetuner.testbeds.mnist.evaluate \
        --model_dir src/diffusers_timetuner/testbeds/mnist
"""
import argparse
import json
import os
import time
from typing import Iterable, List

import torch
from tqdm.auto import tqdm

from . import classifier


@torch.no_grad()
def sample_per_class(pipe, n_per_class: int, num_inference_steps: int, guidance_scale: float = 1.0, seed: int = 0,
                     batch_size: int = 500, progress: bool = False):
    """`n_per_class` samples of each class 0..9 (labels in order), raw model space ([-1, 1]); seeded, batched.

    All of x_T is drawn at once on the CPU from ``torch.Generator().manual_seed(seed)`` (shape (10 n, C, H, W)), so
    the samples depend neither on the device nor on `batch_size`, and every (steps, guidance) setting starts from
    the same x_T.
    """
    labels = torch.arange(10).repeat_interleave(n_per_class)
    unet = pipe.unet
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn(len(labels), unet.config.in_channels, *size, generator=torch.Generator().manual_seed(seed))
    out = []
    for start in tqdm(range(0, len(labels), batch_size), desc=f"sample {num_inference_steps} steps",
                      disable=not progress):
        sl = slice(start, start + batch_size)
        out.append(pipe(class_labels=labels[sl], num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, latents=noise[sl].to(pipe.device, unet.dtype),
                        output_type="latent").images.float().cpu())
    return torch.cat(out), labels


def evaluate(pipe, steps: Iterable[int] = (10, 20, 100), guidance_scales: Iterable[float] = (1.0, 2.0),
             n_per_class: int = 100, seed: int = 0, batch_size: int = 500, progress: bool = False,
             reference_size: int = 28) -> List[dict]:
    """Accuracy (sample classified as its label) and FD-MNIST (vs the 1000 held-out digits at `reference_size`)."""
    rows = []
    for g in guidance_scales:
        for n in steps:
            t0 = time.time()
            x, y = sample_per_class(pipe, n_per_class, n, g, seed, batch_size, progress)
            feats, preds = classifier.classifier_outputs(x)
            fd = classifier.frechet_distance(*classifier.feature_statistics(feats), *classifier.heldout_mnist_statistics(reference_size))
            rows.append({"steps": n, "guidance_scale": g, "n_samples": len(y),
                         "accuracy": float((preds == y).double().mean()), "fd_mnist": fd,
                         "seconds": time.time() - t0})
    return rows


def markdown_table(rows: List[dict], sampler: str = "DDIM") -> str:
    lines = [f"| {sampler} steps | guidance | samples | accuracy | FD-MNIST |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['guidance_scale']:g} | {r['n_samples']} | {100 * r['accuracy']:.1f}% "
                     f"| {r['fd_mnist']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    from diffusers import DDIMScheduler, UNet2DModel

    from ..pipeline import ClassConditionalImagePipeline

    p = argparse.ArgumentParser(description="Evaluate a class-conditional MNIST UNet (accuracy, FD-MNIST).")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--n_per_class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    unet = UNet2DModel.from_pretrained(os.path.join(args.model_dir, "unet")).to(device)
    sched = DDIMScheduler.from_pretrained(os.path.join(args.model_dir, "scheduler"))
    pipe = ClassConditionalImagePipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    rows = evaluate(pipe, n_per_class=args.n_per_class, seed=args.seed, batch_size=args.batch_size, progress=True)
    with open(os.path.join(args.model_dir, "eval.json"), "w") as f:
        json.dump({"device": device, "seed": args.seed, "rows": rows}, f, indent=1)
    table = markdown_table(rows)
    print(table)
    with open(os.path.join(args.model_dir, "PROVENANCE.md"), "a") as f:
        f.write(f"\n## Quality (evaluate.py, seed {args.seed}, {args.n_per_class} samples per class, run on {device}, "
                "float32; FD-MNIST vs the 1000 held-out digits in the classifier's 256-d features)\n\n"
                + table + "\n")


if __name__ == "__main__":
    main()
