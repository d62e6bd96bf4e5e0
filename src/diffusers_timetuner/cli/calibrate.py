#!/usr/bin/env python
"""Calibrate TimeTuner tau tables for a Diffusers model (one CPU, one GPU or many through Accelerate).

    timetuner-calibrate                                   # the main job: bundled flow MNIST model, Euler, 10 steps
    python -m diffusers_timetuner.cli.calibrate --num_inference_steps 10 20 --scheduler dpmsolver
    accelerate launch examples/calibrate.py --output_dir mnist-ddim-10

Writes ``scheduler_config.json`` (load it with ``TimeTuner*Scheduler.from_pretrained(output_dir)``), ``report.json``
and ``calibration.png`` to ``--output_dir`` (main process only), checkpoints after every step to
``<output_dir>/checkpoints`` (``--resume_from_checkpoint`` continues from there).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ..calibration.config import CPU_QUICK_PRESET, PRESETS, CalibrationConfig

# The no-argument run (the README's main job): the bundled flow-matching MNIST UNet, its Euler sampler at 10 steps,
# tau tuned (the library's default), the CPU preset's sizes. Why this model and not the eps MNIST UNet: see the
# measurements beside CPU_QUICK_PRESET (calibration/config.py).
DEFAULT_MODEL = "mnist_flow"
# --scheduler's default: the flow-matching Euler sampler for a flow-matching model, DDIM otherwise
AUTO_SCHEDULER = "auto"

OUTPUT_FILES = ("scheduler_config.json", "report.json", "calibration.png")
CHECKPOINT_SUBDIR = "checkpoints"


@dataclass
class ScriptArguments:
    """The CLI's own options (model, inputs, output, Hub); every calibration setting is a ``CalibrationConfig``
    field."""

    pretrained_model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Diffusers pipeline folder or Hub id, or a bundled testbed: 'mnist_flow' (the default: the "
                "flow-matching MNIST UNet, 16x16), 'mnist' (the class-conditional eps MNIST UNet, 28x28), 'gmm' (the "
                "exact-score mixture), 'flow_gmm' (the same mixture as an exact flow-matching model), 'fashion' (the "
                "Fashion-MNIST UNet)."})
    scheduler: str = field(default=AUTO_SCHEDULER, metadata={
        "help": "auto (flow_euler for a flow-matching model, else ddim), ddim, ddpm, dpmsolver, "
                "dpmsolver_singlestep, euler, flow_euler, unipc, heun, cm, or a (TimeTuner or Diffusers) scheduler "
                "class name; built from the model's scheduler config."})
    preset: str = field(default="cpu", metadata={
        "help": f"Default sizes: 'cpu' ({CPU_QUICK_PRESET['num_samples']} calibration / "
                f"{CPU_QUICK_PRESET['num_validation_samples']} validation / {CPU_QUICK_PRESET['num_heldout_samples']} "
                "held-out samples: 62k network evaluations, under a minute of CPU time for the default flow MNIST "
                "model; a 'mnist' sample costs about 10x as much) or 'none' (the library's defaults). Explicit "
                "options override it.",
        "choices": list(PRESETS)})
    labels: Optional[List[int]] = field(default=None, metadata={"help": "Class labels to calibrate on (cycled)."})
    prompts_file: Optional[str] = field(default=None, metadata={
        "help": "Text file, one prompt per line (text-to-image pipelines)."})
    negative_prompt: str = field(default="", metadata={
        "help": "Negative prompt for guidance with prompts (--guidance_scale != 1; Flux: its true_cfg_scale)."})
    height: Optional[int] = field(default=None, metadata={
        "help": "Image height in pixels of a latent text-to-image pipeline (SD, SD3, Flux), as its height= "
                "argument: sets the latent size (and Flux's time shift mu). Default: the pipeline's default size."})
    width: Optional[int] = field(default=None, metadata={"help": "Image width in pixels; see --height."})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "Images for the data-based strategies: a folder of images, a .pt/.npy/.npz array (N, C, H, W) in "
                "the model's input range, or 'mnist' (the bundled MNIST digits)."})
    output_dir: str = field(default="timetuner-calibration", metadata={"help": "Where the results are written."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a run already in --output_dir."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "Continue from <output_dir>/checkpoints ('latest', the default) or a checkpoint folder.",
        "nargs": "?", "const": "latest"})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the tables to --hub_model_id."})
    hub_model_id: Optional[str] = field(default=None, metadata={"help": "The Hub repo to push to."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo private."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even if a GPU is available."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bars."})


def build_parser(preset: str = "cpu"):
    """The CLI's parser: one option per ``CalibrationConfig`` / ``ScriptArguments`` field, the preset's sizes as
    defaults."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((CalibrationConfig, ScriptArguments),
                              description="Calibrate TimeTuner tau tables (Xia et al., CVPR 2024).")
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
    parser.set_defaults(**PRESETS[preset])
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line: ``args.config`` is the ``CalibrationConfig``, the rest are ``ScriptArguments``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=ScriptArguments.preset)
    preset = pre.parse_known_args(argv)[0].preset
    parser = build_parser(preset)
    config, script = parser.parse_args_into_dataclasses(args=argv)
    args = argparse.Namespace(**dataclasses.asdict(script), config=config)
    args.command = "timetuner-calibrate " + " ".join(shlex.quote(a) for a in argv)
    try:  # user errors: one line and exit code 2, before the model loads or the accelerator starts
        _check_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def _check_args(args: argparse.Namespace) -> None:
    from ..calibration.validate import VALIDATED_ARGS, validate_calibration_args

    config = args.config
    validate_calibration_args(**{name: getattr(config, name) for name in VALIDATED_ARGS if hasattr(config, name)})
    _check_inputs(args)
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/mnist-ddim-timetuner).")
        from ..hub import check_can_push

        check_can_push(args.hub_model_id)  # repo id + login, before minutes of calibration


def _check_inputs(args: argparse.Namespace) -> None:
    """The input files and folders exist and are of a kind the CLI reads (their contents are read before the model
    loads, in ``main``)."""
    if args.labels and args.prompts_file:
        raise ValueError("Give --labels or --prompts_file, not both.")
    for name in ("height", "width"):
        size = getattr(args, name)
        if size is not None and size < 1:
            raise ValueError(f"--{name} must be a positive number of pixels, got {size}.")
    if args.prompts_file is not None and not os.path.isfile(args.prompts_file):
        raise ValueError(f"--prompts_file {args.prompts_file} is not a file: give a text file with one prompt per "
                         "line.")
    source = args.data_dir
    if source is not None and source != "mnist":
        if os.path.isfile(source) and not source.endswith(DATA_SUFFIXES):
            raise ValueError(f"--data_dir {source} is not a {'/'.join(DATA_SUFFIXES)} array file nor a folder of "
                             "images.")
        if not os.path.exists(source):
            raise ValueError(f"--data_dir {source} does not exist: give a folder of images, a "
                             f"{'/'.join(DATA_SUFFIXES)} array file (N, C, H, W), or 'mnist'.")
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not os.path.isdir(resume):
        raise ValueError(f"--resume_from_checkpoint {resume} is not a folder: give the checkpoint folder of the run "
                         "to continue (<output_dir>/checkpoints), or 'latest'.")


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
    checkpoint_dir = _prepare_output_dir(args, accelerator)

    # the user's files first: a bad one is reported before the model loads
    conditions, negative = _conditions(args)
    data = load_data(args.data_dir) if args.data_dir else None
    pipeline, model_id = load_model(args.pretrained_model_name_or_path)
    scheduler = scheduler_for(args.scheduler, pipeline)
    sample_shape = latent_sample_shape(pipeline, args.height, args.width)
    config = args.config
    logger.info(
        f"timetuner-calibrate on {accelerator.num_processes} process(es), device {accelerator.device} "
        f"({accelerator.distributed_type}); model {model_id}; scheduler {scheduler}; steps "
        f"{config.timesteps or config.num_inference_steps or [10]}; objective {config.objective}; "
        f"optimizer {config.optimizer}; "
        f"strategy {config.strategy or ('sequential' if data is not None else 'data_free')}; "
        f"guidance {config.guidance_scale}; {config.num_samples} samples"
        + (f"; x_T of shape {sample_shape}" if sample_shape else ""), main_process_only=True)

    result = calibrate(
        pipeline, scheduler, config=config, conditions=conditions, negative_conditions=negative, data=data,
        sample_shape=sample_shape,
        accelerator=accelerator, checkpoint_dir=checkpoint_dir, progress=not args.no_progress, model_id=model_id,
    )
    if accelerator.is_main_process:
        result.save(args.output_dir, extra={"command": args.command, "versions": versions(),
                                            "num_processes": accelerator.num_processes})
        for line in result_lines(result):
            logger.info(line)
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
    None, ``mnist`` or its id; the exact-score mixture for ``gmm`` or its id (``flow_gmm``: as a flow model); the
    flow-matching MNIST UNet for ``mnist_flow``, the Fashion-MNIST UNet for ``fashion`` (or their ids)."""
    from .. import testbeds

    if path in (None, "mnist", testbeds.MNIST_MODEL_ID):
        return testbeds.load_mnist_pipeline(), testbeds.MNIST_MODEL_ID
    if path in ("gmm", testbeds.GMM_MODEL_ID):
        return testbeds.load_gmm_pipeline(), testbeds.GMM_MODEL_ID
    if path in ("flow_gmm", testbeds.FLOW_GMM_MODEL_ID):
        return testbeds.load_flow_gmm_pipeline(), testbeds.FLOW_GMM_MODEL_ID
    if path in ("mnist_flow", testbeds.MNIST_FLOW_MODEL_ID):
        return testbeds.load_mnist_flow_pipeline(), testbeds.MNIST_FLOW_MODEL_ID
    if path in ("fashion", testbeds.FASHION_MODEL_ID):
        return testbeds.load_fashion_pipeline(), testbeds.FASHION_MODEL_ID
    return load_pipeline_folder(path), path


def load_pipeline_folder(path: str, **kwargs):
    """``DiffusionPipeline.from_pretrained(path)``, with the components its ``model_index.json`` records as absent
    (``[null, null]``: an SD3 pipeline saved without its T5 encoder) passed as None, which diffusers otherwise
    refuses for components it does not list as optional."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(path)
    absent = {name: None for name, value in index.items()
              if not name.startswith("_") and isinstance(value, (list, tuple)) and list(value) == [None, None]}
    return DiffusionPipeline.from_pretrained(path, **{**absent, **kwargs})


def latent_sample_shape(pipeline, height: Optional[int], width: Optional[int]):
    """x_T's shape (latent channels, height / f, width / f) for --height / --width pixels, as the pipeline draws it
    (Flux: before packing); None when neither is given (the model's default)."""
    if height is None and width is None:
        return None
    from ..evaluation_pipelines import TextPipelineSampler, is_latent_pipeline, is_text_pipeline

    if not (is_latent_pipeline(pipeline) and is_text_pipeline(pipeline)):
        raise ValueError(f"--height / --width are the image size of a latent text-to-image pipeline (SD, SD3, Flux); "
                         f"{type(pipeline).__name__} samples its model's own size: leave them out.")
    return TextPipelineSampler(pipeline, [""], height=height, width=width).noise_shape


def result_lines(result) -> List[str]:
    """What a run ends with, per step count: the shipped taus, then the held-out error of the table against the
    untuned sampler on fresh x_T with the paired standard error of the difference, and the run's cost."""
    lines = []
    for n, rep in sorted(result.reports.items()):
        h = rep.heldout
        change, se = h["tuned"] - h["untuned"], h.get("change_se") or 0.0
        clear = f"; {abs(change) / se:.1f} SE {'better' if change < 0 else 'worse'}" if se > 0 else ""
        lines.append(f"n={n}: taus {[round(t, 2) for t in rep.taus]}")
        lines.append(f"n={n}: held-out {h['metric']} on {h.get('num_samples', '?')} x_T: untuned {h['untuned']:.4g} "
                     f"-> tuned {h['tuned']:.4g} ({100 * h['relative_change']:+.1f}%, difference {change:+.3g} "
                     f"+/- {se:.2g} paired SE{clear}); {rep.forward_samples} forward samples, {rep.seconds:.1f} s")
    return lines


def scheduler_for(name: str, pipeline) -> str:
    """The scheduler name to calibrate: ``name``, or for ``auto`` flow_euler when the pipeline's own scheduler is a
    flow-matching one and ddim otherwise."""
    if name != AUTO_SCHEDULER:
        return name
    from ..calibration.prediction import is_flow_matching

    own = getattr(pipeline, "scheduler", None)
    return "flow_euler" if own is not None and is_flow_matching(own) else "ddim"


DATA_SUFFIXES = (".pt", ".npy", ".npz")


def load_data(source: str):
    """Images (and labels where the source has them) for the data-based strategies: a tensor (N, C, H, W), or
    (images, labels)."""
    if source == "mnist":
        from ..testbeds.data import load_mnist

        return load_mnist("train")
    if os.path.isdir(source):
        return _checked_images(_load_image_folder(source), source)
    if not (os.path.isfile(source) and source.endswith(DATA_SUFFIXES)):
        raise ValueError(f"--data_dir {source!r} is neither 'mnist', an array file ({'/'.join(DATA_SUFFIXES)}) nor a "
                         "folder.")
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
        if isinstance(obj, dict):
            images, labels = _pick_images(obj, source), obj.get("labels")
        elif torch.is_tensor(obj):
            images, labels = obj, None
        else:
            raise ValueError(f"--data_dir {source} holds a {type(obj).__name__}, not a tensor: save a tensor "
                             "(N, C, H, W) or a dict {'images': ..., 'labels': ...} with torch.save.")
    else:
        import numpy as np

        try:
            arrays = np.load(source)  # allow_pickle=False: object arrays are refused
        except (ValueError, OSError) as err:
            raise ValueError(f"--data_dir {source} is not a readable NumPy {source[-4:]} file of numbers ({err}).") \
                from None
        if source.endswith(".npz"):
            images = torch.from_numpy(_pick_images(arrays, source))
            labels = torch.from_numpy(arrays["labels"]) if "labels" in arrays else None
        else:
            images, labels = torch.from_numpy(arrays), None
    images = _checked_images(images.float(), source)
    if labels is not None and tuple(torch.as_tensor(labels).shape) != (images.shape[0],):
        raise ValueError(f"--data_dir {source} has {images.shape[0]} images but labels of shape "
                         f"{tuple(torch.as_tensor(labels).shape)}: give one integer label per image.")
    return (images, labels) if labels is not None else images


def _pick_images(arrays, source: str):
    keys = list(arrays.keys()) if hasattr(arrays, "keys") else list(arrays)
    if "images" not in keys:
        raise ValueError(f"--data_dir {source} has no 'images' entry (it holds {keys}): store the images (N, C, H, W) "
                         "under 'images' and optional labels under 'labels'.")
    return arrays["images"]


def _checked_images(images: torch.Tensor, source: str) -> torch.Tensor:
    if images.ndim != 4:
        raise ValueError(f"--data_dir {source} holds images of shape {tuple(images.shape)}; expected (N, C, H, W) "
                         "(add the channel axis for grayscale images).")
    if images.shape[0] == 0:
        raise ValueError(f"--data_dir {source} holds no images (shape {tuple(images.shape)}).")
    return images


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
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(f"--data_dir {folder} holds images of different sizes / channel counts {shapes}: make them "
                         "all the model's size.")
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

    from .._version import __version__

    return {"diffusers_timetuner": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def cli() -> None:
    """Console script ``timetuner-calibrate``: a user error found after parsing (a data file's contents, a model
    that does not fit the options) is one line and exit code 2, like the argument errors."""
    args = parse_args()
    try:
        main(args)
    except ValueError as err:
        print(f"timetuner-calibrate: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
