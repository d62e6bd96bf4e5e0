#!/usr/bin/env python
"""Calibrate TimeTuner tau tables with Accelerate: one CPU, one GPU, or many GPUs, with the same script.

    accelerate launch examples/calibrate.py                 # bundled MNIST model, DDIM at 10 steps, a few CPU minutes
    accelerate launch examples/calibrate.py --help          # every option (one per CalibrationConfig field)

The options come from `CalibrationConfig` (the calibration settings) and the CLI's `ScriptArguments` (model, inputs,
output, Hub); without arguments the CPU preset's sizes apply (`--preset none`: the library's defaults). The console
script `timetuner-calibrate` runs the same job with more logging.
"""
import os
import shutil

import torch
from accelerate import Accelerator

from diffusers_timetuner.calibration import calibrate
from diffusers_timetuner.cli.calibrate import (
    CHECKPOINT_SUBDIR, _conditions, _prepare_output_dir, load_data, load_model, parse_args, versions,
)
from diffusers_timetuner.hub import push_tuned_schedule


def main(args):
    # Samples are split over the processes `accelerate launch` starts; every process returns the same table.
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    accelerator.print(f"Calibrating on {accelerator.num_processes} process(es), device {accelerator.device}")
    checkpoint_dir = _prepare_output_dir(args, accelerator)  # refuses to overwrite another run; resumes one

    # The pipeline (the bundled MNIST testbed by default), its conditions, and images for the data-based strategies
    pipeline, model_id = load_model(args.pretrained_model_name_or_path)
    conditions, negative = _conditions(args)
    data = load_data(args.data_dir) if args.data_dir else None

    result = calibrate(pipeline, args.scheduler, config=args.config, conditions=conditions,
                       negative_conditions=negative, data=data, accelerator=accelerator,
                       checkpoint_dir=checkpoint_dir, progress=not args.no_progress, model_id=model_id)

    if accelerator.is_main_process:
        # scheduler_config.json (TimeTuner*Scheduler.from_pretrained(output_dir)), report.json, calibration.png
        result.save(args.output_dir, extra={"command": args.command, "versions": versions(),
                                            "num_processes": accelerator.num_processes})
        for n, taus in sorted(result.tables.items()):
            accelerator.print(f"n={n}: taus {[round(t, 2) for t in taus]}")
        shutil.rmtree(os.path.join(args.output_dir, CHECKPOINT_SUBDIR), ignore_errors=True)  # the run finished
        if args.push_to_hub:
            push_tuned_schedule(args.output_dir, args.hub_model_id, private=args.hub_private,
                                commit_message=f"TimeTuner tables for {sorted(result.reports)} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(parse_args())
