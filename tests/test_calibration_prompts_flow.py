"""Text prompts for `StableDiffusion3Pipeline` / `FluxPipeline` in `calibrate()` and `timetuner-calibrate`.

Tiny random offline pipelines with one-layer CLIP (and for Flux T5) text encoders and in-memory tokenizers. A table
calibrated from prompts must equal the one calibrated from the embeddings the pipeline's own ``encode_prompt``
returns (the same seeded run on the same network inputs gives the same taus), and a different prompt set must give a
different table (so the equality is not that of inputs that do not matter). The console script runs end to end on
saved pipeline folders; its table is loaded into the pipeline and sampled with the same prompt.
"""
import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffusers_timetuner import TimeTunerFlowMatchEulerDiscreteScheduler, calibrate
from diffusers_timetuner.cli import calibrate as cli
from diffusers_timetuner.testbeds.tiny_pipelines import flux_parts, sd3_parts

FM = TimeTunerFlowMatchEulerDiscreteScheduler
PROMPTS = ["a b c", "d"]  # one-letter words of the tiny vocabularies: they tokenize apart
OTHER_PROMPTS = ["x y", "z"]
NEGATIVE = "e f"
# Flux's scheduler config with the token counts of the tiny latents (an 8x8 latent is 16 packed tokens)
FLUX_CONFIG = dict(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
N = 3


def small(**kw):
    base = dict(num_samples=4, batch_size=4, num_validation_samples=4, num_heldout_samples=4, progress=False,
                guard=False, teacher_steps=6, objective="endpoint", sample_shape=(4, 8, 8))
    base.update(kw)
    return base


def sd3_pipe():
    pipe = StableDiffusion3Pipeline(**sd3_parts(text_encoders=True)[0], scheduler=FlowMatchEulerDiscreteScheduler(
        shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipe(guidance_embeds=False):
    comps = flux_parts(guidance_embeds=guidance_embeds, text_encoders=True)[0]
    pipe = FluxPipeline(**comps, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# under no_grad, as the pipeline's __call__ encodes them (T5 takes another kernel path with autograd on: 7e-6 apart)
@torch.no_grad()
def sd3_embeddings(pipe, prompts, cfg):
    pe, ne, pp, npp = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=cfg,
                                         negative_prompt=NEGATIVE)
    cond = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
    return cond, ({"prompt_embeds": ne[:1], "pooled_prompt_embeds": npp[:1]} if cfg else None)


@torch.no_grad()
def flux_embeddings(pipe, prompts, cfg):
    pe, pp, _ = pipe.encode_prompt(prompts, None, device="cpu")
    neg = None
    if cfg:
        ne, npp, _ = pipe.encode_prompt([NEGATIVE], None, device="cpu")
        neg = {"prompt_embeds": ne, "pooled_prompt_embeds": npp}
    return {"prompt_embeds": pe, "pooled_prompt_embeds": pp}, neg


class InputSpy:
    """Forward pre-hook recording the timestep and the text inputs of every transformer call."""

    def __init__(self, module):
        self.times, self.text, self.pooled = [], [], []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.times.append(float(kwargs["timestep"].reshape(-1)[0]))
        self.text.append(kwargs["encoder_hidden_states"].detach().clone())
        self.pooled.append(kwargs["pooled_projections"].detach().clone())

    def close(self):
        self.handle.remove()


def distinct_rows(tensors):
    rows = torch.cat(tensors).flatten(1)
    return torch.unique(rows, dim=0)


# ------------------------------------------------------------------------------------------ calibrate()
CASES = {
    "sd3": (sd3_pipe, sd3_embeddings, 1.0, {}),
    "sd3_cfg": (sd3_pipe, sd3_embeddings, 2.0, {}),
    "flux_dev": (lambda: flux_pipe(guidance_embeds=True), flux_embeddings, 1.0, {"embedded_guidance_scale": 4.0}),
    "flux_true_cfg": (flux_pipe, flux_embeddings, 2.0, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompts_give_the_table_of_the_pipelines_own_embeddings(case):
    make, embed, guidance, extra = CASES[case]
    pipe = make()
    cfg = guidance != 1.0
    kw = small(guidance_scale=guidance, **extra)
    negative = NEGATIVE if cfg else None
    from_prompts = calibrate(pipe, "flow_euler", N, conditions=PROMPTS, negative_conditions=negative, **kw)
    cond, neg = embed(pipe, PROMPTS, cfg)
    from_embeds = calibrate(pipe, "flow_euler", N, conditions=cond, negative_conditions=neg, **kw)
    other = calibrate(pipe, "flow_euler", N, conditions=OTHER_PROMPTS, negative_conditions=negative, **kw)
    taus = from_prompts.tables[N]
    # the same seeded run on the same network inputs: the same taus, to the bit
    assert taus == from_embeds.tables[N]
    assert taus != other.tables[N]  # the prompts reach the network: other prompts, another table
    assert taus != from_prompts.reports[N].grid  # a real table, not tau = t
    conditioning = from_prompts.settings["conditioning"]
    assert conditioning == {"kind": "prompts", "prompts": PROMPTS, "negative_prompt": NEGATIVE if cfg else ""}
    assert from_prompts.scheduler.config.tuning_info[str(N)]["conditioning"]["prompts"] == PROMPTS


def test_prompt_embeddings_reach_the_transformer():
    pipe = sd3_pipe()
    spy = InputSpy(pipe.transformer)
    try:
        calibrate(pipe, "flow_euler", 2, conditions=PROMPTS, negative_conditions=NEGATIVE,
                  **small(guidance_scale=2.0, num_samples=2, batch_size=2, num_heldout_samples=2, teacher_steps=4))
    finally:
        spy.close()
    cond, neg = sd3_embeddings(pipe, PROMPTS, cfg=True)
    # every call gets the unconditional branch (the negative prompt) and the two prompts, nothing else
    expected = distinct_rows([cond["prompt_embeds"], neg["prompt_embeds"]])
    assert torch.equal(distinct_rows(spy.text), expected)
    assert torch.equal(distinct_rows(spy.pooled), distinct_rows([cond["pooled_prompt_embeds"],
                                                                 neg["pooled_prompt_embeds"]]))
    assert len(expected) == 3  # two prompts and the negative prompt encode apart


# ------------------------------------------------------------------------------------------ refusals, before any work
@pytest.fixture
def no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("text encoding or a network call happened before the inputs were checked")

    for cls in (StableDiffusion3Pipeline, FluxPipeline):
        monkeypatch.setattr(cls, "encode_prompt", fail)
    monkeypatch.setattr(SD3Transformer2DModel, "forward", fail)


def test_bad_prompt_inputs_are_refused_before_any_work(no_work):
    pipe = sd3_pipe()
    with pytest.raises(ValueError, match="must be one negative prompt"):
        calibrate(pipe, "flow_euler", 2, conditions=PROMPTS, negative_conditions=["e", "f"],
                  **small(guidance_scale=2.0))
    bare = StableDiffusion3Pipeline(**sd3_parts()[0], scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    with pytest.raises(ValueError, match="loaded without its text encoders"):
        calibrate(bare, "flow_euler", 2, conditions=PROMPTS, **small())
    with pytest.raises(ValueError, match="need its pipeline"):
        calibrate(pipe.transformer, FM(shift=3.0), 2, conditions=PROMPTS, **small())
    flux = flux_pipe()
    flux.text_encoder_2 = None  # e.g. loaded with text_encoder_2=None to save memory
    with pytest.raises(ValueError, match="FluxPipeline has no text_encoder_2"):
        calibrate(flux, "flow_euler", 2, conditions=PROMPTS, **small())


def test_cli_image_size_is_checked(no_work, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--pretrained_model_name_or_path", "gmm", "--height", "0"])
    assert exc.value.code == 2 and "--height must be a positive number of pixels" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"height=10 is not a multiple of 4"):  # tiny VAE factor 2, x 2 for packing
        cli.latent_sample_shape(flux_pipe(), 10, 16)
    assert cli.latent_sample_shape(flux_pipe(), 16, 32) == (4, 8, 16)  # 16 latent channels packed 2x2 -> 4
    assert cli.latent_sample_shape(sd3_pipe(), None, None) is None


# ------------------------------------------------------------------------------------------ the console script
CLI_SIZES = ["--num_inference_steps", str(N), "--num_samples", "4", "--batch_size", "4", "--num_validation_samples", "4",
             "--num_heldout_samples", "4", "--teacher_steps", "12", "--no_progress"]


def run_cli(tmp_path, pipe, *argv):
    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    result = cli.main(cli.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "pipe"), "--prompts_file",
                                      str(tmp_path / "prompts.txt"), "--output_dir", str(out), *CLI_SIZES, *argv]))
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["conditioning"]["prompts"] == PROMPTS
    assert report["settings"]["scheduler_class"] == "TimeTunerFlowMatchEulerDiscreteScheduler"  # --scheduler auto
    return result, FM.from_pretrained(out)


def sampled_times(pipe, scheduler, **call):
    pipe.scheduler = scheduler
    spy = InputSpy(pipe.transformer)
    try:
        pipe(prompt=PROMPTS[0], num_inference_steps=N, height=16, width=16, output_type="latent",
             generator=torch.Generator().manual_seed(0), **call)
    finally:
        spy.close()
    return spy.times


def test_cli_on_a_saved_sd3_folder_with_guidance_and_a_custom_sigma_grid(tmp_path):
    sigmas = [1.0, 0.6, 0.3]
    result, loaded = run_cli(tmp_path, sd3_pipe(), "--guidance_scale", "2", "--negative_prompt", NEGATIVE,
                             "--sigmas", *map(str, sigmas))
    taus = loaded.config.tuned_timesteps[str(N)]
    assert taus == result.tables[N] and taus != loaded.config.tuned_grids[str(N)]
    # the folder's pipeline, loaded as a user would (it was saved without T5), samples with the table
    pipe = cli.load_pipeline_folder(str(tmp_path / "pipe"))
    times = sampled_times(pipe, loaded, guidance_scale=2.0, negative_prompt=NEGATIVE, sigmas=sigmas)
    assert np.allclose(times, np.float32(taus), rtol=0, atol=1e-3)  # SD3's network time is tau itself


def test_cli_on_a_saved_flux_folder_with_embedded_guidance(tmp_path):
    result, loaded = run_cli(tmp_path, flux_pipe(guidance_embeds=True), "--height", "16", "--width", "16",
                             "--embedded_guidance_scale", "4")
    info = loaded.config.tuning_info[str(N)]
    # mu as FluxPipeline computes it for a 16x16 image (an 8x8 latent: 16 packed tokens)
    assert info["time_shift"] == {"use_dynamic_shifting": True, "mu": calculate_shift(16, 16, 256, 0.5, 1.15)}
    assert info["embedded_guidance_scale"] == 4.0
    taus = loaded.config.tuned_timesteps[str(N)]
    assert taus == result.tables[N] and taus != loaded.config.tuned_grids[str(N)]
    pipe = cli.load_pipeline_folder(str(tmp_path / "pipe"))
    times = sampled_times(pipe, loaded, guidance_scale=4.0)  # Flux's own sigmas and mu: checked by the table
    assert np.allclose(times, np.float32(taus) / 1000, rtol=0, atol=1e-6)  # Flux's network time is tau / 1000
