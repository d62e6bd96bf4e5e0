"""Quality and few-step headroom of the Fashion-MNIST testbed: Inception FID, precision / recall, class accuracy.

Every setting samples the same classes (``n_per_class`` of each, labels 0..9 in order) from the same x_T
(`testbeds.mnist.evaluate.sample_per_class`, seed `--seed`), so settings differ only by the sampler. FID (and k=3
improved precision / recall) is measured in Inception pool features against the 500 bundled 16x16 test images
(`reference.load_reference`); class accuracy uses the bundled linear classifier (`classifier.classify`).
Headroom = FID of a few-step sampler minus the FID of many-step DDIM at the same x_T and sample count.

Example (one process per setting runs them side by side; --reference_features caches the reference features):
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m diffusers_timetuner.testbeds.fashion.evaluate \
        --model_dir src/diffusers_timetuner/testbeds/fashion --settings ddim:100 ddim:10 dpmsolver++:5 \
        --n_per_class 25 --output /tmp/fashion_eval.json
"""
import argparse
import json
import os
import time

import torch

from ...inception import InceptionFeatures, fid, precision_recall
from ..mnist.evaluate import sample_per_class
from .classifier import class_accuracy
from .reference import load_reference

SAMPLERS = ("ddim", "dpmsolver++")


def make_sampler(name: str, ddim_config):
    """The bundled DDIMScheduler config as DDIM or as DPMSolverMultistepScheduler (dpmsolver++, order 2)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(ddim_config)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(ddim_config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}.")


def parse_setting(text: str):
    name, _, steps = text.partition(":")
    if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"a setting is SAMPLER:STEPS with SAMPLER in {SAMPLERS}, e.g. ddim:10; got {text!r}.")
    return name, int(steps)


def reference_features(cache: str = None) -> torch.Tensor:
    """Inception pool features (500, 2048) of the bundled reference images (read from / written to `cache`)."""
    if cache and os.path.exists(cache):
        return torch.load(cache)
    feats = InceptionFeatures(batch_size=25, progress=True)(load_reference()[0])
    if cache:
        torch.save(feats, cache)
    return feats


def evaluate_setting(pipe, sampler: str, steps: int, ref_feats, n_per_class: int, seed: int, batch_size: int = 250):
    t0 = time.time()
    pipe.scheduler = make_sampler(sampler, pipe.scheduler.config)
    x, y = sample_per_class(pipe, n_per_class, steps, 1.0, seed, batch_size)
    feats = InceptionFeatures(batch_size=25, progress=True)(x.clamp(-1.0, 1.0))
    pr = precision_recall(ref_feats, feats, k=3)
    return {"sampler": sampler, "steps": steps, "guidance_scale": 1.0, "n_samples": len(y),
            "n_reference": int(ref_feats.shape[0]), "fid": fid(ref_feats, feats), "precision": pr[0], "recall": pr[1],
            "accuracy": class_accuracy(x, y), "seconds": time.time() - t0}


def main(argv=None):
    from diffusers import DDIMScheduler, UNet2DModel

    from ..pipeline import ClassConditionalImagePipeline

    p = argparse.ArgumentParser(description="Evaluate the Fashion-MNIST UNet (Inception FID, precision / recall).")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--settings", nargs="+", default=["ddim:100", "ddim:10", "dpmsolver++:5"])
    p.add_argument("--n_per_class", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reference_features", default=None, help="cache file for the reference Inception features")
    p.add_argument("--output", required=True, help="JSON file for the rows")
    args = p.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]
    torch.set_num_threads(args.threads)
    unet = UNet2DModel.from_pretrained(os.path.join(args.model_dir, "unet")).eval()
    pipe = ClassConditionalImagePipeline(
        unet=unet, scheduler=DDIMScheduler.from_pretrained(os.path.join(args.model_dir, "scheduler")))
    pipe.set_progress_bar_config(disable=True)
    ref = reference_features(args.reference_features)
    rows = []
    for sampler, steps in settings:
        rows.append(evaluate_setting(pipe, sampler, steps, ref, args.n_per_class, args.seed))
        print(json.dumps(rows[-1]), flush=True)
        with open(args.output, "w") as f:
            json.dump({"device": "cpu", "seed": args.seed, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
