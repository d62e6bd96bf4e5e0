"""`timetuner-evaluate` on latent text-to-image pipelines (Stable Diffusion, SD3, Flux) and the energy-distance
verdict of stochastic samplers, end to end on tiny random offline pipelines with tables that differ from tau = t.

Figures are checked against an independent computation: the same pipeline called by hand (diffusers' own
schedulers, ``latents=`` from the seed the evaluation promises, ``output_type="latent"``).
"""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
)
from hub_server.outputs import tiny_stable_diffusion, tuned_sd_scheduler
from test_pipelines_flow import FLUX_CONFIG, flux, sd3, shifted  # noqa: F401  (fixtures: tiny SD3 / Flux parts)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffusers_timetuner import evaluation, evaluation_pipelines, testbeds
from diffusers_timetuner.calibration.stats import energy_distance_change_se
from diffusers_timetuner.cli import evaluate as cli_evaluate
from diffusers_timetuner.evaluation import EvaluationConfig, evaluate_tuned_schedule, prepare_evaluation
from diffusers_timetuner.metrics import energy_distance
from diffusers_timetuner.schedulers import (
    TimeTunerDDIMScheduler,
    TimeTunerDDPMScheduler,
    TimeTunerFlowMatchEulerDiscreteScheduler,
)
from diffusers_timetuner.testbeds.tiny_pipelines import clip_text_config as clip_config
from diffusers_timetuner.testbeds.tiny_pipelines import clip_tokenizer, t5_parts

PROMPTS = ["a b c", "d", "e f"]  # one-letter words of the tiny tokenizers; 3 prompts cycled over the samples
N, TEACHER = 4, 8  # tiny sizes: enough to test the bookkeeping, not the quality
FM = TimeTunerFlowMatchEulerDiscreteScheduler


# ------------------------------------------------------------------------------------------ tiny pipelines
@pytest.fixture(scope="module")
def sd():
    pipe = tiny_stable_diffusion()  # UNet + VAE + CLIP text encoder; 8x8 images (VAE factor 1)
    pipe.tokenizer = clip_tokenizer()  # prompts of one-letter words that tokenize apart
    return pipe


@pytest.fixture(scope="module")
def sd3_pipe(sd3):  # noqa: F811  (the imported fixture)
    comps, _ = sd3
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(**dict(
        comps, text_encoder=CLIPTextModelWithProjection(clip_config()).eval(), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()).eval(), tokenizer_2=clip_tokenizer()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # no T5: SD3 then uses zero T5 embeddings
    pipe.register_to_config(_name_or_path="test-org/tiny-sd3")
    return pipe


@pytest.fixture(scope="module")
def flux_pipe(flux):  # noqa: F811  (the imported fixture)
    comps, _ = flux
    torch.manual_seed(0)
    tokenizer_2, text_encoder_2 = t5_parts()
    pipe = FluxPipeline(**dict(comps, text_encoder=CLIPTextModel(clip_config()).eval(), tokenizer=clip_tokenizer(),
                               text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2),
                        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG))
    pipe.register_to_config(_name_or_path="test-org/tiny-flux")
    return pipe


def flow_table(n, **config):
    """A flow-matching Euler table whose taus are the untuned grid moved by 2.5 (not tau = t)."""
    probe = FlowMatchEulerDiscreteScheduler(**config)
    probe.set_timesteps(n, **({"mu": 0.5} if config.get("use_dynamic_shifting") else {}))
    return FM(**config, tuned_timesteps={n: shifted([float(t) for t in probe.timesteps])})


def by_hand(pipe, scheduler, steps, noise, prompts, **kw):
    """The pipeline itself with diffusers' own scheduler, from the x_T and prompts the evaluation promises."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(prompt=prompts, latents=noise, num_inference_steps=steps, output_type="latent", **kw).images
    finally:
        pipe.scheduler = original


def seed_noise(num, shape, seed=0):
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ Stable Diffusion
@pytest.fixture(scope="module")
def sd_result(sd):
    config = EvaluationConfig(num_samples=N, teacher_steps=TEACHER, batch_size=N, grid_columns=2)
    return evaluate_tuned_schedule(sd, tuned_sd_scheduler(3), config, prompts=PROMPTS, progress=False)


def test_sd_figures_equal_an_independent_computation(sd, sd_result):
    prompts = [PROMPTS[i % 3] for i in range(N)]
    noise = seed_noise(N, (4, 8, 8))  # the seed's x_T in SD's latent shape (4 channels, 8x8 at VAE factor 1)
    guidance = dict(guidance_scale=5.0)  # the table records guidance 5.0, which the evaluation uses by default
    table = tuned_sd_scheduler(3)
    untuned = by_hand(sd, DDIMScheduler.from_config(table.config), 3, noise, prompts, **guidance)
    tuned = by_hand(sd, tuned_sd_scheduler(3), 3, noise, prompts, **guidance)
    # the teacher for an eps model: DPM-Solver++ 2M on a linspace grid, diffusers' own class
    teacher_sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
        final_sigmas_type="zero", lower_order_final=True)
    teacher = by_hand(sd, teacher_sched, TEACHER, noise, prompts, **guidance)
    assert not torch.allclose(untuned, tuned)  # the table differs from tau = t
    for name, ref in (("untuned_3", untuned), ("tuned_3", tuned), ("teacher", teacher)):
        torch.testing.assert_close(sd_result.samples[name], ref, rtol=0, atol=1e-5)
    # the prompts matter, so the match above also says each sample got its own prompt (cycled by index)
    shuffled = by_hand(sd, DDIMScheduler.from_config(table.config), 3, noise, prompts[1:] + prompts[:1], **guidance)
    assert (shuffled - untuned).abs().max() > 1e-3

    e_u = ((untuned.double() - teacher.double()) ** 2).flatten(1).sum(1).numpy()
    e_t = ((tuned.double() - teacher.double()) ** 2).flatten(1).sum(1).numpy()
    rep = sd_result.report["step_counts"]["3"]
    assert rep["endpoint_mse_untuned"] == pytest.approx(e_u.mean(), rel=1e-4)
    assert rep["endpoint_mse_tuned"] == pytest.approx(e_t.mean(), rel=1e-4)
    assert rep["change"] == pytest.approx((e_t - e_u).mean(), rel=1e-3, abs=1e-7)
    assert rep["change_se"] == pytest.approx((e_t - e_u).std(ddof=1) / math.sqrt(N), rel=1e-3)
    assert rep["taus"] == pytest.approx(table.config["tuned_timesteps"]["3"], abs=1e-3)
    assert rep["verdict_line"].startswith("n=3: ")
    report = sd_result.report
    assert report["space"] == "latent" and report["metric"] == "endpoint_mse" and not report["stochastic"]
    assert "latent space" in report["definitions"]["endpoint_mse"]
    assert report["teacher"]["scheduler_class"] == "DPMSolverMultistepScheduler"
    assert report["prompts"] == PROMPTS and report["pipeline_call"]["guidance_scale"] == 5.0
    json.dumps(report)


def test_sd_grid_images_are_the_pipeline_decoding_of_the_same_samples(sd, sd_result):
    # without reference images only the grid's columns (2) are decoded; they are what the pipeline decodes
    assert sd_result.images["tuned_3"].shape == (2, 3, 8, 8)
    prompts = [PROMPTS[i % 3] for i in range(2)]
    original = sd.scheduler
    sd.scheduler = tuned_sd_scheduler(3)
    try:
        decoded = sd(prompt=prompts, latents=seed_noise(N, (4, 8, 8))[:2], num_inference_steps=3,
                     guidance_scale=5.0, output_type="pt").images
    finally:
        sd.scheduler = original
    torch.testing.assert_close(sd_result.images["tuned_3"], decoded * 2 - 1, rtol=0, atol=1 / 255 + 1e-6)
    assert sd.scheduler is original  # the evaluation left the user's scheduler in place


def test_sd_batches_split_like_processes_give_the_same_samples(sd):
    plan = prepare_evaluation(sd, tuned_sd_scheduler(3), EvaluationConfig(num_samples=N, teacher_steps=TEACHER,
                                                                          batch_size=2, grid_columns=2),
                              prompts=PROMPTS)
    whole = plan.sample_batch(range(N))
    parts = [plan.sample_batch([3, 1]), plan.sample_batch([0, 2])]  # any split, any order (as processes get)
    merged = plan.summarize(parts)
    torch.testing.assert_close(merged.samples["tuned_3"], whole["tuned_3"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ SD3 and Flux
def test_sd3_untuned_and_tuned_are_the_pipelines_own_samples(sd3_pipe):
    table = flow_table(3, shift=3.0)
    config = EvaluationConfig(num_samples=3, teacher_steps=TEACHER, batch_size=3, grid_columns=2, height=16,
                              width=16, guidance_scale=2.0)
    result = evaluate_tuned_schedule(sd3_pipe, table, config, prompts=PROMPTS, progress=False)
    noise = seed_noise(3, (4, 16 // 2, 16 // 2))  # SD3: transformer in_channels x (size / VAE factor 2)
    kw = dict(height=16, width=16, guidance_scale=2.0)
    untuned = by_hand(sd3_pipe, FlowMatchEulerDiscreteScheduler(shift=3.0), 3, noise, PROMPTS, **kw)
    tuned = by_hand(sd3_pipe, flow_table(3, shift=3.0), 3, noise, PROMPTS, **kw)
    teacher = by_hand(sd3_pipe, FlowMatchEulerDiscreteScheduler(shift=3.0), TEACHER, noise, PROMPTS, **kw)
    assert not torch.allclose(untuned, tuned)
    for name, ref in (("untuned_3", untuned), ("tuned_3", tuned), ("teacher", teacher)):
        torch.testing.assert_close(result.samples[name], ref, rtol=0, atol=1e-5)
    assert result.report["teacher"]["scheduler_class"] == "TimeTunerFlowMatchEulerDiscreteScheduler"  # untuned
    assert result.images["teacher"].shape == (2, 3, 16, 16)


def test_flux_packed_latents_and_dynamic_shift(flux_pipe):
    table = flow_table(3, **FLUX_CONFIG)
    config = EvaluationConfig(num_samples=2, teacher_steps=TEACHER, batch_size=2, grid_columns=2, height=16,
                              width=16)
    result = evaluate_tuned_schedule(flux_pipe, table, config, prompts=PROMPTS, progress=False)
    # Flux: 16 / 4 = 4 latent channels at 16 / 2 = 8x8, packed into (8 / 2) * (8 / 2) = 16 tokens of 4 * 4 = 16
    unpacked = seed_noise(2, (4, 8, 8))
    noise = unpacked.view(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 16)
    kw = dict(height=16, width=16)
    untuned = by_hand(flux_pipe, FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG), 3, noise, PROMPTS[:2], **kw)
    tuned = by_hand(flux_pipe, flow_table(3, **FLUX_CONFIG), 3, noise, PROMPTS[:2], **kw)
    assert result.samples["tuned_3"].shape == (2, 16, 16)
    assert not torch.allclose(untuned, tuned)
    torch.testing.assert_close(result.samples["untuned_3"], untuned, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.samples["tuned_3"], tuned, rtol=0, atol=1e-5)
    assert "packed" in result.report["definitions"]["endpoint_mse"]
    # the grid the pipeline ran: its own mu from the image sequence length (16 tokens), not the table's probe
    probe = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    probe.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert result.report["step_counts"]["3"]["grid"] == pytest.approx(probe.timesteps.tolist(), abs=1e-3)


# ------------------------------------------------------------------------------------------ stochastic samplers
def ddpm_table(n=3, r=1.1):
    """A DDPM table on SD's noise schedule with taus 10% above the grid (capped at 999): not tau = t."""
    base = TimeTunerDDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1)
    base.set_timesteps(n)
    grid = [float(t) for t in base.timesteps]
    return base.with_tuned_timesteps(n, [min(999.0, t * r) for t in grid]), grid


def test_stochastic_sampler_is_judged_by_energy_distance(sd):
    table, grid = ddpm_table()
    config = EvaluationConfig(num_samples=6, teacher_steps=TEACHER, batch_size=3, grid_columns=2)
    result = evaluate_tuned_schedule(sd, table, config, prompts=PROMPTS, check_model_id=False, progress=False)
    report = result.report
    assert report["stochastic"] and report["metric"] == "energy_distance"
    rep = report["step_counts"]["3"]
    assert "endpoint_mse_tuned" not in rep  # an endpoint distance means little when every step draws fresh noise
    s = result.samples
    # independent figures: metrics.energy_distance of each set against the teacher's set
    e_u, e_t = energy_distance(s["untuned_3"], s["teacher"]), energy_distance(s["tuned_3"], s["teacher"])
    assert rep["energy_distance_untuned"] == pytest.approx(e_u, rel=1e-6)
    assert rep["energy_distance_tuned"] == pytest.approx(e_t, rel=1e-6)
    assert rep["change"] == pytest.approx(e_t - e_u, rel=1e-6, abs=1e-9)
    assert rep["change_se"] == pytest.approx(energy_distance_change_se(s["tuned_3"], s["untuned_3"], s["teacher"]))
    assert rep["change_se"] > 0
    expected = evaluation.verdict_for(rep["change"], rep["change_se"])
    assert rep["verdict"] == expected
    word = {"helps": "HELPS", "does not help": "DOES NOT HELP"}.get(expected, "CANNOT TELL")
    assert word in rep["verdict_line"] and "energy distance to the 8-step teacher's samples" in rep["verdict_line"]
    assert report["teacher"]["scheduler_class"] == "DPMSolverMultistepScheduler"  # deterministic reference set


def test_stochastic_sampler_gets_the_same_step_noise_per_sample(sd):
    """An identity table (tau = t) reproduces untuned exactly, whatever the batch split: each sample's step noise
    comes from its own generator (seed + 1 + index), so the table's effect is not the noise's; the change is 0 and
    the verdict CANNOT TELL."""
    table, grid = ddpm_table()
    identity = table.with_tuned_timesteps(3, grid)
    plan = prepare_evaluation(sd, identity, EvaluationConfig(num_samples=4, teacher_steps=TEACHER, batch_size=4,
                                                             grid_columns=2), prompts=PROMPTS, check_model_id=False)
    whole = plan.sample_batch([0, 1, 2, 3])
    torch.testing.assert_close(whole["tuned_3"], whole["untuned_3"], rtol=0, atol=0)
    halves = [plan.sample_batch([0, 1]), plan.sample_batch([2, 3])]
    torch.testing.assert_close(torch.cat([h["tuned_3"] for h in halves]), whole["tuned_3"], rtol=1e-4, atol=1e-5)
    rep = plan.summarize([whole]).report["step_counts"]["3"]
    assert rep["change"] == 0.0 and rep["verdict"].startswith("cannot tell")


# ------------------------------------------------------------------------------------------ refusals, before sampling
@pytest.fixture
def no_sampling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("sampling started before the table / arguments were checked")

    monkeypatch.setattr(evaluation, "sample", fail)
    monkeypatch.setattr(evaluation_pipelines.TextPipelineSampler, "__call__", fail)


def small(**kw):
    return EvaluationConfig(num_samples=4, teacher_steps=TEACHER, grid_columns=2, **kw)


def test_prompts_missing_for_a_text_pipeline(sd, no_sampling):
    with pytest.raises(ValueError, match="text-to-image pipeline: pass prompts"):
        prepare_evaluation(sd, tuned_sd_scheduler(3), small())


def test_prompts_given_to_a_class_conditional_pipeline(no_sampling):
    from diffusers_timetuner.hub import load_tuned_scheduler

    with pytest.raises(ValueError, match="takes no prompt"):
        prepare_evaluation(testbeds.load_mnist_pipeline(), load_tuned_scheduler("mnist-ddim-5-g1"), small(),
                           prompts=PROMPTS)


@pytest.mark.parametrize("make_table, match", [
    (lambda: flow_table(3, shift=3.0), "sampler family: the table's TimeTunerFlowMatchEulerDiscreteScheduler uses "
                                       r"flow matching \(sigmas\)"),
    (lambda: TimeTunerDDIMScheduler(tuned_timesteps={"3": [700.0, 400.0, 50.0]}), "betas"),  # SD's are scaled_linear
    (lambda: tuned_sd_scheduler(3), r"tuned for test-org/tiny-sd, pipeline is test-org/another"),
])
def test_table_for_another_sampler_family_noise_schedule_or_model(make_table, match, no_sampling):
    other = tiny_stable_diffusion("test-org/another")
    table = make_table()
    with pytest.raises(ValueError, match=match):
        prepare_evaluation(other, table, small(), prompts=PROMPTS)


def test_flow_table_with_another_shift_and_another_step_count(sd3_pipe, no_sampling):
    with pytest.raises(ValueError, match=r"shift: table 1\.0, pipeline 3\.0"):
        prepare_evaluation(sd3_pipe, flow_table(3, shift=1.0), small(), prompts=PROMPTS)
    with pytest.raises(ValueError, match=r"tables for \[3\] steps, not for \[5\]"):
        prepare_evaluation(sd3_pipe, flow_table(3, shift=3.0), small(num_inference_steps=[5]), prompts=PROMPTS)


@pytest.mark.parametrize("shape, match", [
    ((5, 3, 16, 16), r"reference images are 3x16x16 .* samples are 3x8x8"),
    ((5, 1, 8, 8), r"reference images are 1x8x8 .* samples are 3x8x8"),
])
def test_reference_images_that_cannot_be_compared(sd, shape, match, no_sampling):
    with pytest.raises(ValueError, match=match):
        prepare_evaluation(sd, tuned_sd_scheduler(3), small(), prompts=PROMPTS, reference_images=torch.zeros(shape))


@pytest.mark.parametrize("config, match", [
    (dict(height=15), "height=15 is not a multiple of 4"),  # Flux: VAE factor 2 x 2 for packed latents
    (dict(negative_prompt="z"), "negative_prompt only with true_cfg_scale > 1"),
])
def test_flux_settings_refused(flux_pipe, config, match, no_sampling):
    with pytest.raises(ValueError, match=match):
        prepare_evaluation(flux_pipe, flow_table(3, **FLUX_CONFIG), small(**config), prompts=PROMPTS)


def test_flux2_pipeline_refused_before_any_sampling(no_sampling):
    from diffusers import Flux2Pipeline

    from diffusers_timetuner.testbeds.tiny_pipelines import flux2_parts

    comps, _ = flux2_parts()
    pipe = Flux2Pipeline(**comps, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG))
    with pytest.raises(ValueError, match="Flux.2 transformer.*not supported by this evaluation"):
        prepare_evaluation(pipe, flow_table(3, **FLUX_CONFIG), small(), prompts=PROMPTS)


def test_text_settings_refused_for_a_pixel_pipeline(no_sampling):
    from diffusers_timetuner.hub import load_tuned_scheduler

    with pytest.raises(ValueError, match="negative_prompt, height apply to text-to-image pipelines"):
        prepare_evaluation(testbeds.load_mnist_pipeline(), load_tuned_scheduler("mnist-ddim-5-g1"),
                           small(negative_prompt="x", height=32))


@pytest.mark.parametrize("argv, match", [
    (["--prompts", "/nonexistent/prompts.txt"], "is not a file"),
    (["--torch_dtype", "float8"], "--torch_dtype must be one of"),
])
def test_bad_text_arguments_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_evaluate.parse_args(["--tuned_schedule", "mnist-ddim-5-g1", *argv])
    assert exc.value.code == 2 and re.search(match, capsys.readouterr().err)


def test_empty_prompts_file_exits_2(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(SystemExit):
        cli_evaluate.parse_args(["--tuned_schedule", "mnist-ddim-5-g1", "--prompts", str(tmp_path / "p.txt")])
    assert "holds no prompt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the console script
def test_cli_on_a_saved_sd_pipeline_with_prompts_file_and_reference_folder(sd, tmp_path):
    from PIL import Image

    sd.save_pretrained(tmp_path / "pipe")
    tuned_sd_scheduler(3).save_pretrained(tmp_path / "table")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    g = torch.Generator().manual_seed(3)
    for k in range(4):  # 4 random 8x8 RGB images: the samples' size, so FID / P&R can be computed
        Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()).save(
            ref / f"{k}.png")
    out = tmp_path / "eval"
    argv = ["--tuned_schedule", str(tmp_path / "table"), "--pretrained_model_name_or_path", str(tmp_path / "pipe"),
            "--skip_model_id_check", "--prompts", str(tmp_path / "prompts.txt"), "--num_samples", "4",
            "--teacher_steps", str(TEACHER), "--batch_size", "4", "--grid_columns", "2", "--reference_dir", str(ref),
            "--output_dir", str(out), "--no_progress"]
    result = cli_evaluate.main(cli_evaluate.parse_args(argv))
    assert sorted(os.listdir(out)) == ["report.json", "samples_grid.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline_class"] == "StableDiffusionPipeline" and report["prompts"] == PROMPTS
    assert report["prompts_file"] == str(tmp_path / "prompts.txt") and report["space"] == "latent"
    # with a reference folder every sample is decoded, and FID is computed on those images
    assert result.images["tuned_3"].shape == (4, 3, 8, 8)
    assert set(report["inception"]) == {"teacher", "untuned_3", "tuned_3"}
    assert report["inception"]["tuned_3"]["num_reference"] == 4
    from diffusers_timetuner.inception import InceptionFeatures, fid

    feats = InceptionFeatures(progress=False)
    ref_pool = feats(evaluation.load_image_folder(str(ref)))
    pool = feats(result.images["tuned_3"])
    assert report["inception"]["tuned_3"]["fid"] == pytest.approx(fid(ref_pool, pool), rel=1e-6)


def test_two_process_launch_on_a_text_pipeline_matches_one_process(sd, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) on examples/evaluate.py with a saved tiny SD pipeline and a
    prompts file: the same figures as a one-process run (the same x_T and prompt per sample index, any split)."""
    import shutil
    import subprocess

    from test_evaluate import ROOT, _free_port

    accelerate = shutil.which("accelerate")
    assert accelerate is not None, "the `accelerate` launcher is not on PATH"
    sd.save_pretrained(tmp_path / "pipe")
    tuned_sd_scheduler(3).save_pretrained(tmp_path / "table")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["--tuned_schedule", str(tmp_path / "table"), "--pretrained_model_name_or_path", str(tmp_path / "pipe"),
              "--skip_model_id_check", "--prompts", str(tmp_path / "prompts.txt"), "--num_samples", "5",
              "--teacher_steps", str(TEACHER), "--batch_size", "2", "--grid_columns", "3", "--no_progress", "--cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli_evaluate.main(cli_evaluate.parse_args([*common, "--output_dir", str(one)]))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
              os.path.join(ROOT, "examples", "evaluate.py"), *common, "--output_dir", str(two)]
    run = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Evaluating on 2 process(es)" in run.stdout
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r2["num_processes"] == 2 and r2["space"] == "latent"
    for key in ("endpoint_mse_untuned", "endpoint_mse_tuned", "change", "change_se"):
        assert r2["step_counts"]["3"][key] == pytest.approx(r1["step_counts"]["3"][key], rel=1e-4, abs=1e-7), key


def test_negative_prompt_defaults_to_the_one_the_table_was_calibrated_with(sd):
    """A table calibrated with prompts records its negative prompt (tuning_info[n]["conditioning"]); without
    --negative_prompt the evaluation uses it, as the pipeline called by hand with that negative prompt shows."""
    base = tuned_sd_scheduler(3)
    info = dict(base.config["tuning_info"]["3"], conditioning={"kind": "prompts", "prompts": PROMPTS,
                                                               "negative_prompt": "g h"})
    table = base.with_tuned_timesteps(3, base.config["tuned_timesteps"]["3"], grid=base.config["tuned_grids"]["3"],
                                      info=info)
    plan = prepare_evaluation(sd, table, EvaluationConfig(num_samples=2, teacher_steps=TEACHER, grid_columns=1),
                              prompts=PROMPTS)
    assert plan.text_sampler.settings()["negative_prompt"] == "g h"
    got = plan.sample_batch([0, 1])["tuned_3"]
    noise = seed_noise(2, (4, 8, 8))
    with_neg = by_hand(sd, table, 3, noise, PROMPTS[:2], guidance_scale=5.0, negative_prompt=["g h"] * 2)
    without = by_hand(sd, table, 3, noise, PROMPTS[:2], guidance_scale=5.0)
    torch.testing.assert_close(got, with_neg, rtol=0, atol=1e-5)
    assert (with_neg - without).abs().max() > 1e-4  # the negative prompt matters at guidance 5
    # an explicit one wins
    plan = prepare_evaluation(sd, table, EvaluationConfig(num_samples=2, teacher_steps=TEACHER, grid_columns=1,
                                                          negative_prompt="z"), prompts=PROMPTS)
    assert plan.text_sampler.settings()["negative_prompt"] == "z"
