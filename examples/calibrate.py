#!/usr/bin/env python
"""Calibrate TimeTuner tau tables with Accelerate: one CPU, one GPU, or many GPUs, with the same script.

    accelerate launch examples/calibrate.py                 # the main job: bundled flow MNIST model, Euler at 10 steps
    accelerate launch examples/calibrate.py --help          # every option (one per CalibrationConfig field)

The options come from `CalibrationConfig` (the calibration settings) and the CLI's `ScriptArguments` (model, inputs,
output, Hub); without arguments the bundled flow-matching MNIST UNet is tuned for its Euler sampler at 10 steps with
the CPU preset's sizes (`--preset none`: the library's defaults; `--pretrained_model_name_or_path mnist`: the eps
MNIST UNet, with DDIM). The console script `timetuner-calibrate` runs the same job with more logging.
"""
import os
import shutil

import torch
from accelerate import Accelerator

from diffusers_timetuner.calibration import calibrate
from diffusers_timetuner.cli.calibrate import (
    CHECKPOINT_SUBDIR, _conditions, _prepare_output_dir, load_data, load_model, parse_args, result_lines, scheduler_for,
    versions,
)
from diffusers_timetuner.hub import push_tuned_schedule


def main(args):
    # Samples are split over the processes `accelerate launch` starts; every process returns the same table.
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    accelerator.print(f"Calibrating on {accelerator.num_processes} process(es), device {accelerator.device}")
    checkpoint_dir = _prepare_output_dir(args, accelerator)  # refuses to overwrite another run; resumes one

    # The pipeline (the bundled flow MNIST testbed by default), its conditions, images for the data-based strategies
    pipeline, model_id = load_model(args.pretrained_model_name_or_path)
    scheduler = scheduler_for(args.scheduler, pipeline)  # auto: flow_euler for a flow-matching model, else ddim
    conditions, negative = _conditions(args)
    data = load_data(args.data_dir) if args.data_dir else None

    result = calibrate(pipeline, scheduler, config=args.config, conditions=conditions,
                       negative_conditions=negative, data=data, accelerator=accelerator,
                       checkpoint_dir=checkpoint_dir, progress=not args.no_progress, model_id=model_id)

    if accelerator.is_main_process:
        # scheduler_config.json (TimeTuner*Scheduler.from_pretrained(output_dir)), report.json, calibration.png
        result.save(args.output_dir, extra={"command": args.command, "versions": versions(),
                                            "num_processes": accelerator.num_processes})
        for line in result_lines(result):  # per step count: the taus, held-out error tuned vs untuned (paired SE)
            accelerator.print(line)
        shutil.rmtree(os.path.join(args.output_dir, CHECKPOINT_SUBDIR), ignore_errors=True)  # the run finished
        if args.push_to_hub:
            push_tuned_schedule(args.output_dir, args.hub_model_id, private=args.hub_private,
                                commit_message=f"TimeTuner tables for {sorted(result.reports)} steps")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main(parse_args())
