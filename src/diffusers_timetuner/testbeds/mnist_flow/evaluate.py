"""Quality figures of the flow-matching MNIST testbed: class accuracy and FD-MNIST per number of Euler steps.

Samples are 16x16 and the classifier sees them resized to 28x28 (`classifier.preprocess_for_classifier`), so
FD-MNIST here compares them with the 1000 held-out digits downsampled to 16x16 the same way
(``heldout_mnist_statistics(16)``): against the 28x28 originals the blur alone costs about 1000. `real_16px_floor`
is what real digits score on this scale: the 4000 training digits at 16x16 (at 28x28 against 28x28: 9.7).

Example (writes eval.json and appends a table to PROVENANCE.md in --model_dir):
    OMP_NUM_THREADS=1 PYTHONPATH=src python -m diffusers_timetuner.testbeds.mnist_flow.evaluate \
        --model_dir src/diffusers_timetuner/testbeds/mnist_flow --steps 10 100
"""
import argparse
import json
import os

import torch

from ..mnist import classifier
from ..mnist.evaluate import evaluate, markdown_table


def real_16px_floor() -> float:
    """FD-MNIST (16x16 reference) of the 4000 real training digits at 16x16, the lowest a perfect model can expect."""
    from ..data import downsample, load_mnist

    images, _ = load_mnist("train")
    feats, _ = classifier.classifier_outputs(downsample(images, 16))
    return classifier.frechet_distance(*classifier.feature_statistics(feats), *classifier.heldout_mnist_statistics(16))


def main(argv=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from ..pipeline import ClassConditionalImagePipeline

    p = argparse.ArgumentParser(description="Evaluate the flow-matching MNIST UNet (accuracy, FD-MNIST).")
    p.add_argument("--model_dir", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100])
    p.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0])
    p.add_argument("--n_per_class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None, help="JSON file (default: <model_dir>/eval.json, table in PROVENANCE)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    unet = UNet2DModel.from_pretrained(os.path.join(args.model_dir, "unet")).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(args.model_dir, "scheduler"))
    pipe = ClassConditionalImagePipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    rows = evaluate(pipe, steps=args.steps, guidance_scales=args.guidance_scales, n_per_class=args.n_per_class,
                    seed=args.seed, batch_size=args.batch_size, progress=True, reference_size=16)
    result = {"device": "cpu", "sampler": "FlowMatchEulerDiscreteScheduler(shift=1.0)", "seed": args.seed,
              "real_16px_floor": real_16px_floor(), "rows": rows}
    with open(args.output or os.path.join(args.model_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown_table(rows, sampler="Euler")
    print(table, f"\nreal 16x16 training digits: FD-MNIST {result['real_16px_floor']:.2f}")
    if args.output is None:
        with open(os.path.join(args.model_dir, "PROVENANCE.md"), "a") as f:
            f.write(f"\n## Quality (evaluate.py, seed {args.seed}, {args.n_per_class} samples per class, CPU float32; "
                    "FD-MNIST vs the 1000 held-out digits downsampled to 16x16, in the classifier's 256-d features, "
                    "both resized 16 -> 28)\n\n" + table + f"\n\nThe 4000 real training digits downsampled to 16x16 score "
                    f"{result['real_16px_floor']:.2f} on this scale (what real digits reach).\n")


if __name__ == "__main__":
    main()
