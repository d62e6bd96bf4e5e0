#!/usr/bin/env python
"""Check a tuned schedule on your checkpoint: the same x_T with and without the table, against a many-step teacher.

    timetuner-evaluate --tuned_schedule mnist-ddim-5-g1                        # bundled table on the bundled model
    timetuner-evaluate --tuned_schedule ORG/NAME --pretrained_model_name_or_path ./my-pipeline --num_samples 1000
    timetuner-evaluate --tuned_schedule ORG/sd15-ddim-10 --pretrained_model_name_or_path ORG/sd15 \
        --prompts prompts.txt --guidance_scale 7.5 --torch_dtype float16        # a text-to-image pipeline
    accelerate launch -m diffusers_timetuner.cli.evaluate --tuned_schedule ...  # samples split over the processes

Writes ``report.json`` (command, versions, device, every figure, the verdict per step count) and
``samples_grid.png`` (teacher | untuned | tuned rows, the same x_T per column) to ``--output_dir`` (main process).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..evaluation import GRID_NAME, REPORT_NAME, EvaluationConfig, validate_evaluation_config


@dataclass
class EvaluateArguments:
    """The CLI's own options (model, table, reference images, output); the evaluation settings are
    ``EvaluationConfig`` fields."""

    tuned_schedule: str = field(metadata={
        "help": "The tuned schedule: a bundled name (e.g. mnist-ddim-5-g1), a local folder or a Hub repo id."})
    pretrained_model_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "Diffusers pipeline folder or Hub id (pixel-space, or latent text-to-image: Stable Diffusion, SD3, "
                "Flux), or 'mnist' / 'gmm' for a bundled testbed (default: the bundled testbed the table was tuned "
                "for)."})
    prompts: Optional[str] = field(default=None, metadata={
        "aliases": ["--prompts_file"],  # timetuner-calibrate's name for the same file
        "help": "Text-to-image pipelines: a text file of prompts, one per line (blank lines skipped), cycled over "
                "the samples."})
    torch_dtype: Optional[str] = field(default=None, metadata={
        "help": "Load a pipeline folder / Hub id in this dtype (float32, float16 or bfloat16; default: as saved)."})
    subfolder: str = field(default="scheduler", metadata={
        "help": "Where the table's config lives in a repo / folder."})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub branch, tag or commit of the table."})
    skip_model_id_check: bool = field(default=False, metadata={
        "help": "Do not compare the model the table records with the pipeline's name (the same weights under "
                "another name, e.g. a local copy). The noise schedule is always checked."})
    reference_dir: Optional[str] = field(default=None, metadata={
        "help": "A folder of real images, or 'mnist' (the bundled 1000 held-out MNIST digits, classes interleaved): "
                "adds Inception FID / sFID / precision / recall (needs the eval extra)."})
    max_reference_images: Optional[int] = field(default=None, metadata={
        "help": "Use at most this many reference images (sorted by file name)."})
    output_dir: str = field(default="timetuner-evaluation", metadata={"help": "Where report.json and the grid go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an evaluation in --output_dir."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even if a GPU is available."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})


def build_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser((EvaluationConfig, EvaluateArguments), prog="timetuner-evaluate",
                            description="Check whether a TimeTuner table helps a checkpoint: the same x_T sampled "
                                        "with and without it, compared with a many-step teacher.")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """``args.config`` is the ``EvaluationConfig``, the rest are ``EvaluateArguments``. Bad values exit with code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config, script = parser.parse_args_into_dataclasses(args=argv)
    args = argparse.Namespace(**dataclasses.asdict(script), config=config)
    args.command = "timetuner-evaluate " + " ".join(shlex.quote(a) for a in argv)
    try:  # one line and exit code 2, before the model or the table loads
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def check_args(args: argparse.Namespace) -> None:
    validate_evaluation_config(args.config)
    if not args.tuned_schedule.strip():
        raise ValueError("--tuned_schedule is empty: pass a bundled name, a folder or a Hub repo id.")
    if args.prompts is not None:
        read_prompts(args.prompts)
    if args.torch_dtype is not None and args.torch_dtype not in DTYPES:
        raise ValueError(f"--torch_dtype must be one of {', '.join(DTYPES)}, got {args.torch_dtype!r}.")
    if args.reference_dir is not None:
        if args.reference_dir != "mnist" and not os.path.isdir(args.reference_dir):
            raise ValueError(f"--reference_dir {args.reference_dir} is not a folder (nor 'mnist').")
        from ..inception import inception_weights_path

        try:
            inception_weights_path()
        except ImportError as err:
            raise ValueError(f"--reference_dir needs the Inception weights: {err}") from None
    if args.max_reference_images is not None and args.max_reference_images < 4:
        raise ValueError("--max_reference_images must be >= 4 (precision / recall use k = 3 neighbours).")
    if args.reference_dir is not None and args.config.num_samples < 4:
        raise ValueError("--reference_dir needs --num_samples >= 4 (precision / recall use k = 3 neighbours).")
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output_dir {out} is a file; pass a folder path (it is created if missing).")
    occupied = os.path.isdir(out) and any(os.path.exists(os.path.join(out, f)) for f in (REPORT_NAME, GRID_NAME))
    if occupied and not args.overwrite_output_dir:
        raise ValueError(f"--output_dir {out} already holds an evaluation: pass --overwrite_output_dir to replace "
                         "it, or choose another --output_dir.")


DTYPES = ("float32", "float16", "bfloat16")


def read_prompts(path: str) -> List[str]:
    """The prompts of a text file, one per line (blank lines skipped); a missing or empty file is refused."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {path} is not a file: pass a text file with one prompt per line.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (one per line).")
    return prompts


def load_reference(source: str, limit: Optional[int] = None) -> torch.Tensor:
    """Reference images in [-1, 1]: a folder, or 'mnist' (the held-out digits, ordered 0, 1, ..., 9, 0, 1, ... so
    that any ``limit`` keeps the classes balanced)."""
    from ..evaluation import load_image_folder

    if source != "mnist":
        images = load_image_folder(source, limit=limit)
    else:
        from ..testbeds.data import load_mnist

        images, labels = load_mnist("heldout")
        rank = torch.zeros_like(labels)
        for c in labels.unique():
            rank[labels == c] = torch.arange(int((labels == c).sum()))
        images = images[torch.argsort(rank * 10 + labels)][:limit]
    if images.shape[0] < 4:
        raise ValueError(f"--reference_dir {source} holds {images.shape[0]} images; precision / recall need at "
                         "least 4.")
    return images


def load_pipeline(name: Optional[str], tuned_scheduler, torch_dtype: Optional[str] = None):
    """(pipeline, model id): ``name`` as ``timetuner-calibrate`` reads it; None picks the bundled testbed the table
    records (a table for another model needs --pretrained_model_name_or_path). ``torch_dtype`` (a name) applies to
    a pipeline folder / Hub id."""
    from .. import testbeds
    from .calibrate import load_model, load_pipeline_folder

    if name is None:
        recorded = {i.get("model_id") for i in (tuned_scheduler.config.get("tuning_info") or {}).values()
                    if isinstance(i, dict)}
        bundled = recorded & {testbeds.MNIST_MODEL_ID, testbeds.GMM_MODEL_ID}
        if len(bundled) == 1:
            name = bundled.pop()
        elif recorded - {None}:
            raise ValueError(f"The table was tuned for {', '.join(sorted(recorded - {None}))}: pass that model with "
                             "--pretrained_model_name_or_path.")
        else:
            name = "mnist"
    if torch_dtype is None:
        return load_model(name)
    testbed_ids = {testbeds.MNIST_MODEL_ID, testbeds.GMM_MODEL_ID, testbeds.FLOW_GMM_MODEL_ID,
                   testbeds.MNIST_FLOW_MODEL_ID, testbeds.FASHION_MODEL_ID}
    if name in {"mnist", "gmm", "flow_gmm", "mnist_flow", "fashion"} | testbed_ids:
        raise ValueError(f"--torch_dtype applies to a pipeline folder or Hub id, not the bundled testbed {name}: "
                         "leave it out.")
    return load_pipeline_folder(name, torch_dtype=getattr(torch, torch_dtype)), name


def main(args: argparse.Namespace):
    """Load the table and the model, check that they fit (before sampling), sample, report. Returns the
    ``EvaluationResult`` on the main process, None elsewhere."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .. import testbeds
    from ..evaluation import prepare_evaluation
    from ..hub import load_tuned_scheduler
    from .calibrate import versions

    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    level = logging.INFO if state.is_main_process else logging.ERROR
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=level, force=True)
    logger = logging.getLogger("diffusers_timetuner.evaluate")

    tuned = load_tuned_scheduler(args.tuned_schedule, subfolder=args.subfolder, revision=args.revision)
    pipeline, model_id = load_pipeline(args.pretrained_model_name_or_path, tuned, args.torch_dtype)
    pipeline.to(state.device)
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    reference = load_reference(args.reference_dir, args.max_reference_images) if args.reference_dir else None
    plan = prepare_evaluation(pipeline, tuned, args.config, prompts=prompts, reference_images=reference,
                              check_model_id=not args.skip_model_id_check,
                              source=args.tuned_schedule)  # every check, before any sampling
    logger.info(f"timetuner-evaluate on {state.num_processes} process(es), device {state.device}: "
                f"{args.tuned_schedule} ({type(tuned).__name__}, steps {plan.steps}) on {model_id}; "
                f"{plan.num_samples} samples, teacher {type(plan.teacher).__name__} {args.config.teacher_steps} "
                f"steps, guidance {plan.guidance_scale}, "
                f"{'energy distance (stochastic sampler)' if plan.stochastic else 'endpoint distance'} in "
                f"{'latent' if plan.latent else 'pixel'} space")

    with state.split_between_processes(list(range(plan.num_samples))) as mine:
        records = plan.sample_all(mine, progress=state.is_main_process and not args.no_progress)
    if state.num_processes > 1:
        records = gather_object(records)
    result = None
    if state.is_main_process:
        result = plan.summarize(records, reference_images=reference,
                                fd_mnist=model_id == testbeds.MNIST_MODEL_ID, inception_device=state.device,
                                progress=not args.no_progress)
        extra = {"command": args.command, "versions": versions(), "device": str(state.device),
                 "reference_dir": args.reference_dir, "prompts_file": args.prompts, "torch_dtype": args.torch_dtype,
                 "num_processes": state.num_processes}
        paths = result.save(args.output_dir, extra=extra)
        for line in result.verdict_lines():
            logger.info(line)
        logger.info(f"wrote {', '.join(paths)}")
    state.wait_for_everyone()
    return result


def cli() -> None:
    """Console script ``timetuner-evaluate``."""
    args = parse_args()
    try:
        main(args)
    except ValueError as err:  # a table that does not fit, a model it was not tuned for: one clear line
        print(f"timetuner-evaluate: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
