#!/usr/bin/env python
"""Does a tuned schedule help your checkpoint? One CPU, one GPU or many GPUs through Accelerate, the same script.

    accelerate launch examples/evaluate.py --tuned_schedule mnist-ddim-5-g1 --num_samples 256
    accelerate launch examples/evaluate.py --tuned_schedule ORG/sd3-flow-euler-10 \
        --pretrained_model_name_or_path ORG/sd3 --prompts prompts.txt --torch_dtype bfloat16   # text-to-image
    accelerate launch examples/evaluate.py --help     # every option (EvaluationConfig fields + the CLI's own)

The same x_T (and labels or prompts) are sampled without the table, with it, and by a many-step teacher; the report
says how far each few-step sample lands from the teacher's (stochastic samplers: how far each sample set lies from
the teacher's, in energy distance), whether the table helps (by more than 2 standard errors), and with
--reference_dir the Inception FID / sFID / precision / recall. The console script `timetuner-evaluate` runs the
same job.
"""
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from diffusers_timetuner import testbeds
from diffusers_timetuner.cli.calibrate import versions
from diffusers_timetuner.cli.evaluate import load_pipeline, load_reference, parse_args, read_prompts
from diffusers_timetuner.evaluation import prepare_evaluation
from diffusers_timetuner.hub import load_tuned_scheduler


def main(args):
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    state.print(f"Evaluating on {state.num_processes} process(es), device {state.device}")

    # The table (bundled name, folder or Hub id) and the model it is checked on; a table made for another model,
    # sampler family or noise schedule, missing / unwanted prompts and reference images of another size are refused
    # here, before any sampling.
    tuned = load_tuned_scheduler(args.tuned_schedule, subfolder=args.subfolder, revision=args.revision)
    pipeline, model_id = load_pipeline(args.pretrained_model_name_or_path, tuned, args.torch_dtype)
    pipeline.to(state.device)
    prompts = read_prompts(args.prompts) if args.prompts else None
    reference = load_reference(args.reference_dir, args.max_reference_images) if args.reference_dir else None
    plan = prepare_evaluation(pipeline, tuned, args.config, prompts=prompts, reference_images=reference,
                              check_model_id=not args.skip_model_id_check, source=args.tuned_schedule)

    # Every process holds the same x_T; each samples its share: teacher, then untuned and tuned per step count
    # (text-to-image pipelines through their own __call__, with latents=).
    records = []
    with state.split_between_processes(list(range(plan.num_samples))) as mine:
        for batch in tqdm(plan.batches(mine), desc="evaluate", disable=not state.is_main_process or args.no_progress):
            records.append(plan.sample_batch(batch))
    records = gather_object(records) if state.num_processes > 1 else records

    if state.is_main_process:
        result = plan.summarize(records, reference_images=reference, fd_mnist=model_id == testbeds.MNIST_MODEL_ID,
                                inception_device=state.device, progress=not args.no_progress)
        result.save(args.output_dir, extra={"command": args.command, "versions": versions(),
                                            "device": str(state.device), "num_processes": state.num_processes})
        for line in result.verdict_lines():
            print(line)
        print(f"report.json and samples_grid.png in {args.output_dir}")
    state.wait_for_everyone()


if __name__ == "__main__":
    main(parse_args())
