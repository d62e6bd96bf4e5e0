"""Calibration: the library API on an exact Gaussian model and tiny UNets (fast, CPU)."""

import copy

import pytest
import torch

from diffusers_timetuner.calibration import LocalSearch, calibrate
from diffusers_timetuner.calibration.rollout import Rollout, to_epsilon
from diffusers_timetuner.denoiser import Denoiser
from diffusers_timetuner.sampling import sample_trajectory
from test_calibration_helpers import GaussianEps, ddim, gaussian_data, tiny_unet

SHAPE = (1, 4, 4)


def _small(**kw):
    base = dict(num_samples=16, batch_size=8, num_validation_samples=8, num_heldout_samples=16, sample_shape=SHAPE,
                progress=False)
    base.update(kw)
    return base


# ------------------------------------------------------------------------------------------------ the step path
@pytest.mark.parametrize(
    "scheduler_name, config",
    [
        ("TimeTunerDDIMScheduler", {"clip_sample": False}),
        ("TimeTunerDDIMScheduler", {"clip_sample": False, "timestep_spacing": "linspace"}),
        ("TimeTunerDDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}),
        ("TimeTunerDPMSolverScheduler", {}),
        ("TimeTunerDPMSolverSinglestepScheduler", {}),
        ("TimeTunerEulerDiscreteScheduler", {}),
    ],
)
def test_rollout_with_candidate_taus_is_the_tuned_schedulers_inference(scheduler_name, config):
    """Calibration evaluates a candidate by feeding tau to the network and stepping with the grid key; that must be
    exactly what `sample()` does with a scheduler holding that table (the contract: the update ignores tau)."""
    import diffusers_timetuner.schedulers as tt

    sched = getattr(tt, scheduler_name)(**config)
    model = GaussianEps(sched.alphas_cumprod)
    den = Denoiser(model)
    n = 6
    rollout = Rollout(den, sched, n)
    taus = [t - 7.0 * ((-1) ** j) for j, t in enumerate(rollout.grid_list)]
    taus[-1] = max(rollout.grid_list[-1] + 3.0, 1.0)
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    state = rollout.initial_state(rollout.noise_to_state(noise), seed=5)
    ours = [state.x]
    for j in range(n):
        state = rollout.step(state, taus[j])
        ours.append(state.x)
    tuned = sched.with_tuned_timesteps(n, taus, grid=rollout.grid_list)
    ref = sample_trajectory(den, copy.deepcopy(tuned), noise, n)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_to_epsilon_recovers_the_noise_prediction(prediction_type):
    sched = ddim(prediction_type=prediction_type)
    eps_model = GaussianEps(sched.alphas_cumprod)
    model = GaussianEps(sched.alphas_cumprod, prediction_type=prediction_type)
    x = torch.randn(2, *SHAPE)
    t = torch.full((2,), 437.0)
    torch.testing.assert_close(to_epsilon(model(x, t), x, 437.0, sched), eps_model(x, t), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ optimisers
def test_local_search_finds_a_quadratic_minimum_to_tolerance():
    fit = LocalSearch(xtol=0.5).minimize(lambda tau: (tau - 512.3) ** 2, 500.0, 100.0, (0.0, 999.0))
    assert abs(fit.tau - 512.3) <= 0.5
    # the recorded losses are the function's values at the start and at the returned tau
    assert fit.loss_before == pytest.approx((500.0 - 512.3) ** 2, rel=1e-12)
    assert fit.loss_after == pytest.approx((fit.tau - 512.3) ** 2, rel=1e-12, abs=1e-12)
    assert fit.evaluations <= 30


def test_local_search_stays_in_the_local_basin():
    # Two minima: a shallow one near t0 (t0 + 6) and a deeper one far away (t0 - 80, inside the trust region).
    f = lambda tau: min((tau - 506.0) ** 2, (tau - 420.0) ** 2 - 30.0)  # noqa: E731
    fit = LocalSearch(xtol=0.5).minimize(f, 500.0, 100.0, (0.0, 999.0))
    assert abs(fit.tau - 506.0) <= 0.5


def test_local_search_never_returns_worse_than_t():
    fit = LocalSearch().minimize(lambda tau: abs(tau - 300.0), 300.0, 50.0, (0.0, 999.0))
    assert fit.tau == 300.0 and fit.loss_after == fit.loss_before == 0.0


# ------------------------------------------------------------------------------------------------ the paper
def test_paper_sequential_never_tunes_the_last_step_and_lowers_each_loss():
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    res = calibrate(model, sched, 6, objective="paper", strategy="sequential", data=gaussian_data(64),
                    guard=False, **_small())
    rep = res.reports[6]
    assert len(rep.steps) == 5  # the last step (t_1 -> t_0) is never tuned
    assert rep.taus[-1] == rep.grid[-1]
    # Each search moves its tau and strictly lowers its eq. 9 loss (the search keeps tau = t, with an equal loss, when
    # it finds nothing better). Measured when written (loss_after / loss_before per step, t = 830 ... 166): 0.9995,
    # 0.977, 0.826, 0.484, 0.928; the step at t = 332 must at least cut its loss by a third.
    for rec in rep.steps:
        assert rec.tau != rec.t and rec.loss_after < rec.loss_before, rec
    assert rep.steps[3].t == 332 and rep.steps[3].loss_after < 0.67 * rep.steps[3].loss_before
    sched_loaded = res.scheduler
    sched_loaded.set_timesteps(6)
    torch.testing.assert_close(sched_loaded.timesteps, torch.tensor(rep.taus, dtype=torch.float32))
    info = sched_loaded.config.tuning_info["6"]
    assert info["objective"] == "paper" and info["guidance_scale"] == 1.0


def test_reference_adam_lands_where_the_local_search_lands_on_the_exact_model():
    """docs/facts.md, 1: on an exact model the 1-D search and Adam (r = tau / t) agree, the search far cheaper.
    (Trailing spacing: with "leading" the last tuned step targets eps at t = 0, where eq. 9 degenerates.)"""
    sched = ddim(timestep_spacing="trailing")
    model = GaussianEps(sched.alphas_cumprod)
    data = gaussian_data(64)
    kw = _small(num_samples=16, batch_size=16)
    ls = calibrate(model, sched, 4, objective="paper", strategy="sequential", data=data, guard=False, **kw)
    adam = calibrate(model, sched, 4, objective="paper", strategy="sequential", data=data, guard=False,
                     optimizer="adam", optimizer_kwargs={"num_steps": 300, "lr": 2e-2}, **kw)
    a, b = ls.reports[4], adam.reports[4]
    # grid 999, 749, 499, 249. Step 0 stays at 999 (the top of the range [0, 999], where both end) and the last
    # step is never tuned by eq. 9, so both are tau = t. Steps 1 and 2 move: measured local search 749.293 /
    # 506.310, Adam 749.255 / 506.318 (differences 0.038 and 0.008). A tolerance of 0.1 tells Adam from tau = t
    # (0.29 and 7.3 away from the search's taus).
    assert a.taus[0] == b.taus[0] == 999.0 and a.taus[3] == b.taus[3] == 249.0, (a.taus, b.taus)
    for k in (1, 2):
        assert abs(a.taus[k] - a.grid[k]) > 0.25, a.taus
        assert abs(a.taus[k] - b.taus[k]) <= 0.1, (a.taus, b.taus)
    assert a.forward_samples * 5 < b.forward_samples
    assert b.steps[0].backward_samples > 0 and a.steps[0].backward_samples == 0


def test_parallel_strategy_fits_every_step_independently():
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    res = calibrate(model, sched, 5, objective="paper", strategy="parallel", data=gaussian_data(64), **_small())
    rep = res.reports[5]
    assert [r.step for r in rep.steps] == [0, 1, 2, 3]
    # every step found a better tau on its own (measured loss_after / loss_before: 0.9987, 0.941, 0.656, 0.919)
    assert all(r.tau != r.t and r.loss_after < r.loss_before for r in rep.steps), rep.steps
    assert rep.steps[2].loss_after < 0.8 * rep.steps[2].loss_before


def test_parallel_strategy_refuses_a_multistep_solver():
    from diffusers_timetuner.schedulers import TimeTunerDPMSolverScheduler

    sched = TimeTunerDPMSolverScheduler()
    with pytest.raises(ValueError, match="one-step solver"):
        calibrate(GaussianEps(sched.alphas_cumprod), sched, 5, objective="paper", strategy="parallel",
                  data=gaussian_data(16), **_small())


# ------------------------------------------------------------------------------------------------ beyond the paper
def test_endpoint_objective_data_free_cuts_the_heldout_error_on_the_exact_model():
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    res = calibrate(model, sched, 6, objective="endpoint", **_small())
    h = res.reports[6].heldout
    # Measured when written: about -60 % (untuned 0.22, tuned 0.09); require at least a 25 % cut on held-out x_T.
    assert h["endpoint_mse_tuned"] < 0.75 * h["endpoint_mse_untuned"], h
    assert not res.worse_than_untuned
    assert res.settings["data_free"] is True


def test_worse_tables_are_flagged_and_the_guard_refuses_them(caplog):
    """Eq. 9 with DDIM "leading" at n = 4 (last tuned step targets eps at t = 0) pulls tau_2 far up on the exact
    model and triples the held-out endpoint error (measured: 0.26 -> 0.91): the run must say so loudly, and the
    validation guard must refuse that step."""
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    kw = dict(objective="paper", strategy="sequential", data=gaussian_data(64))
    with caplog.at_level("WARNING"):
        bad = calibrate(model, sched, 4, guard=False, **kw, **_small())
    assert bad.worse_than_untuned and bad.reports[4].warnings
    assert any("TUNING MADE IT WORSE" in r.message for r in caplog.records)
    guarded = calibrate(model, sched, 4, guard=True, **kw, **_small())
    rep = guarded.reports[4]
    assert any(not r.kept for r in rep.steps)
    for r in rep.steps:
        if not r.kept:
            assert r.tau == r.t and r.proposed_tau != r.t
    assert not guarded.worse_than_untuned
    assert guarded.to_dict()["worse_than_untuned"] is False


def test_errors_are_clear():
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    with pytest.raises(ValueError, match="Unknown scheduler"):
        calibrate(model, "no-such-scheduler", 5, **_small())
    with pytest.raises(ValueError, match="not in \\[1, 1000\\]"):
        calibrate(model, sched, 1001, **_small())
    with pytest.raises(ValueError, match="no `data` was given"):
        calibrate(model, sched, 5, objective="paper", strategy="sequential", **_small())
    with pytest.raises(ValueError, match="no `data` was given"):
        calibrate(model, sched, 5, objective="paper", strategy="parallel", **_small())
    with pytest.raises(ValueError, match="fractional"):
        calibrate(GaussianEps(sched.alphas_cumprod, round_timesteps=True), sched, 5, **_small())
    with pytest.raises(ValueError, match="unconditional"):
        calibrate(model, sched, 5, guidance_scale=3.0, **_small())
    with pytest.raises(ValueError, match="Unknown objective"):
        calibrate(model, sched, 5, objective="nope", **_small())


def test_class_conditional_unet_with_guidance_runs_both_branches_and_combines_them(monkeypatch):
    """Every network call of a guided calibration is one batch [null class, label] on the same x and t, and what the
    sampler gets is uncond + g (cond - uncond) of that call's two halves (recomputed here from the spied outputs)."""
    from diffusers_timetuner.denoiser import Denoiser

    unet = tiny_unet(num_class_embeds=3)  # labels 0, 1 + null class 2
    calls = []  # (sample, timestep, class_labels, output) of every network call

    def record(module, args, kwargs, output):
        calls.append((args[0], args[1], kwargs["class_labels"], output.sample))

    unet.register_forward_hook(record, with_kwargs=True)
    guided = []  # (index of the network call it came from, what the denoiser returned)
    denoise = Denoiser.__call__

    def spy(self, sample, timestep, cond=None):
        out = denoise(self, sample, timestep, cond)
        guided.append((len(calls) - 1, out))
        return out

    monkeypatch.setattr(Denoiser, "__call__", spy)
    res = calibrate(unet, ddim(), 3, guidance_scale=2.0, conditions=[0, 1], num_samples=4, batch_size=4,
                    num_validation_samples=2, num_heldout_samples=2, teacher_steps=9, progress=False)
    info = res.scheduler.config.tuning_info["3"]
    assert info["guidance_scale"] == 2.0
    assert info["conditioning"]["null_class_label"] == 2
    assert len(calls) > 10 and len(guided) == len(calls)  # one batched network call per guided evaluation
    labels_seen = set()
    for x, t, labels, _ in calls:
        half = x.shape[0] // 2
        assert x.shape[0] == 2 * half and torch.equal(x[:half], x[half:]) and torch.equal(t[:half], t[half:])
        assert labels[:half].tolist() == [2] * half  # the null class first, as diffusers pipelines order them
        labels_seen |= set(labels[half:].tolist())
    assert labels_seen == {0, 1}
    for i, out in guided:
        uncond, cond = calls[i][3].chunk(2)
        torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond), rtol=0, atol=0)


def test_plain_diffusers_scheduler_is_converted_and_other_tables_kept():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(clip_sample=False)
    model = GaussianEps(sched.alphas_cumprod)
    res = calibrate(model, sched, [3, 4], **_small())
    assert type(res.scheduler).__name__ == "TimeTunerDDIMScheduler"
    assert sorted(res.scheduler.config.tuned_timesteps) == ["3", "4"]
    assert sorted(res.reports) == [3, 4]


def test_stochastic_ddpm_calibration_is_reproducible():
    """DDPM steps draw noise; calibration seeds it per (chunk, step), so candidates share it and runs repeat."""
    from diffusers_timetuner.schedulers import TimeTunerDDPMScheduler

    sched = TimeTunerDDPMScheduler(clip_sample=False)
    model = GaussianEps(sched.alphas_cumprod)
    # guard off: at these sizes the guard keeps no DDPM step (tau = t, measured), which would repeat trivially
    kw = dict(objective="paper", strategy="sequential", data=gaussian_data(32), guard=False, **_small())
    a = calibrate(model, sched, 4, **kw)
    b = calibrate(model, sched, 4, **kw)
    assert a.tables == b.tables
    assert sum(abs(tau - t) > 1.0 for tau, t in zip(a.tables[4], a.reports[4].grid)) >= 2, a.tables  # not tau = t
    assert calibrate(model, sched, 4, seed=1, **kw).tables != a.tables  # the seeded noise does shape the table


def test_joint_adam_through_the_sampler_beats_untuned_on_the_exact_model():
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    res = calibrate(model, sched, 5, objective="endpoint", optimizer="adam_joint",
                    optimizer_kwargs={"num_steps": 40, "lr": 1e-2}, **_small())
    rep = res.reports[5]
    # Measured when written: held-out MSE 0.21 -> 0.001 at n = 6 with 100 iterations; require a 25 % cut here.
    assert rep.heldout["endpoint_mse_tuned"] < 0.75 * rep.heldout["endpoint_mse_untuned"]
    assert rep.backward_samples > 0
    with pytest.raises(ValueError, match="adam_joint"):
        calibrate(model, sched, 5, objective="paper", optimizer="adam_joint", strategy="sequential",
                  data=gaussian_data(16), **_small())


class _CountingPipeline:
    """Forwards to a StableDiffusionPipeline and counts encode_prompt calls (prompts must be encoded once)."""

    def __init__(self, pipe):
        self.pipe, self.unet, self.scheduler, self.encode_calls = pipe, pipe.unet, pipe.scheduler, 0

    def encode_prompt(self, *args, **kwargs):
        self.encode_calls += 1
        return self.pipe.encode_prompt(*args, **kwargs)


def test_text_conditional_pipeline_with_guidance_encodes_prompts_once():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=1000, max_position_embeddings=16))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "cat</w>": 3, "dog</w>": 4}
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok,
                                   scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    counting = _CountingPipeline(pipe)
    res = calibrate(counting, None, 2, conditions=["a cat", "a dog"], guidance_scale=3.0, num_samples=4,
                    batch_size=4, num_validation_samples=2, num_heldout_samples=2, progress=False)
    assert counting.encode_calls == 1
    info = res.scheduler.config.tuning_info["2"]
    assert info["guidance_scale"] == 3.0 and info["conditioning"]["prompts"] == ["a cat", "a dog"]
    assert type(res.scheduler).__name__ == "TimeTunerDDIMScheduler"


@pytest.mark.parametrize(
    "scheduler_name",
    ["TimeTunerDDIMScheduler", "TimeTunerDDPMScheduler", "TimeTunerDPMSolverScheduler",
     "TimeTunerDPMSolverSinglestepScheduler", "TimeTunerEulerDiscreteScheduler"],
)
def test_every_timetuner_scheduler_class_calibrates_and_reloads(scheduler_name, tmp_path):
    import diffusers_timetuner.schedulers as tt

    cls = getattr(tt, scheduler_name)
    sched = cls(clip_sample=False) if "DD" in scheduler_name else cls()
    model = GaussianEps(sched.alphas_cumprod)
    # DDPM: at these sizes the guard keeps no step (tau = t, measured), so it runs unguarded to reload a real table
    guard = scheduler_name != "TimeTunerDDPMScheduler"
    res = calibrate(model, sched, 4, guard=guard, **_small())
    table = res.tables[4]
    assert any(abs(tau - t) > 1.0 for tau, t in zip(table, res.reports[4].grid)), table  # not tau = t
    res.save(str(tmp_path))
    loaded = cls.from_pretrained(str(tmp_path))
    loaded.set_timesteps(4)
    assert loaded.timesteps.tolist() == pytest.approx(table, abs=1e-4)
    assert (tmp_path / "report.json").exists() and (tmp_path / "calibration.png").exists()
    if guard:
        assert not res.worse_than_untuned  # the guard keeps only steps that do not worsen validation


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_prediction_types_are_converted_to_eps_for_eq9(prediction_type):
    """The same exact model in another parameterisation gives the same eq. 9 loss at tau = t (outputs converted to
    eps with the grid's alpha/sigma). Tables may differ: at tau != t the scheduler converts an x0 / v output with
    the grid's alpha/sigma, so f_tau itself depends on the parameterisation (the scheduler contract)."""
    kw = dict(objective="paper", strategy="sequential", data=gaussian_data(32), guard=False, **_small())
    ref_sched = ddim(timestep_spacing="trailing")
    ref = calibrate(GaussianEps(ref_sched.alphas_cumprod), ref_sched, 4, **kw)
    sched = ddim(timestep_spacing="trailing", prediction_type=prediction_type)
    other = calibrate(GaussianEps(sched.alphas_cumprod, prediction_type=prediction_type), sched, 4, **kw)
    for k in range(3):  # every step's loss at tau = t is computed on the same states: x_T, then ...
        a, b = ref.reports[4].steps[k], other.reports[4].steps[k]
        # rel 1e-3 of losses ~1e-2; abs 1e-8 for the ~3e-7 losses at t = 999, where float32 round-off dominates
        assert b.loss_before == pytest.approx(a.loss_before, rel=1e-3, abs=1e-8)
        if ref.tables[4][k] != other.tables[4][k]:  # ... the trajectories part once a tau differs
            break


def test_repeated_taus_are_made_distinct():
    """A search can end on a neighbouring grid time that another step kept (seen on the GMM with endpoint + guard:
    tau[4] = tau[5] = 400); the table must stay valid (distinct taus) and almost unchanged."""
    from diffusers_timetuner.calibration.api import distinct_taus

    out = distinct_taus([900.0, 500.0, 400.0, 400.0, 0.0], (0.0, 999.0))
    assert out[:3] == [900.0, 500.0, 400.0] and out[4] == 0.0
    assert abs(out[3] - 400.0) <= 0.02 and abs(out[3] - 400.0) > 1e-3
    ddim().with_tuned_timesteps(5, out)  # a valid table


def test_calibration_runs_where_the_network_is_without_an_accelerator():
    """No accelerator: calibrate() evaluates the network on its own device (it used to move a GPU model to the CPU).
    A CPU-only machine has one other device, "meta" (shapes, no values): calibrate() must leave the network there
    and feed it meta inputs; it then stops at the first check of the output's values, which meta cannot give."""
    from diffusers_timetuner.calibration.api import model_device

    unet = tiny_unet().to("meta")
    seen = []
    unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].device.type, args[1].device.type)))
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        calibrate(unet, ddim(), 3, num_samples=4, batch_size=4, num_validation_samples=2, num_heldout_samples=2,
                  teacher_steps=9, progress=False)
    assert seen and set(seen) == {("meta", "meta")}  # sample and timestep on the network's device
    assert {p.device.type for p in unet.parameters()} == {"meta"}  # not moved

    assert model_device(torch.nn.Linear(2, 2).to("meta")).type == "meta"
    assert model_device(tiny_unet()).type == "cpu"
    assert model_device(lambda x, t: x).type == "cpu"  # a parameter-free callable
    sched = ddim()
    assert model_device(GaussianEps(sched.alphas_cumprod)).type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_a_cuda_network_is_calibrated_on_cuda_and_left_there():
    unet = tiny_unet().to("cuda")
    res = calibrate(unet, ddim(), 3, num_samples=4, batch_size=4, num_validation_samples=2, num_heldout_samples=2,
                    teacher_steps=9, progress=False)
    assert next(unet.parameters()).is_cuda
    assert res.reports[3].forward_samples > 0


def test_custom_grid_is_calibrated_and_sampled_with_the_same_timesteps():
    """A custom (quadratic-like) grid: the table records it, `set_timesteps(timesteps=grid)` applies it, and the
    scheduler's own grid for the same n is refused (the table was tuned elsewhere)."""
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    grid = [999, 640, 360, 160, 40]
    res = calibrate(model, sched, timesteps=grid, objective="endpoint", **_small())
    rep = res.reports[5]
    assert rep.grid == [float(t) for t in grid]
    assert rep.heldout["endpoint_mse_tuned"] < rep.heldout["endpoint_mse_untuned"]
    tuned = copy.deepcopy(res.scheduler)
    tuned.set_timesteps(timesteps=grid)
    assert tuned.grid_timesteps.tolist() == grid and tuned.timesteps.tolist() == pytest.approx(rep.taus)
    # sampling on that grid feeds the network the taus, and differs from the untuned sampler on the same grid
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    den, seen = Denoiser(model), []

    def spy(x, t, cond=None):
        seen.append(float(t))
        return den(x, t, cond)

    out = sample_trajectory(spy, tuned, noise, None)[-1]
    assert seen == pytest.approx(rep.taus, abs=1e-4)
    plain = ddim()
    plain.set_timesteps(timesteps=grid)
    assert not torch.equal(out, sample_trajectory(den, plain, noise, None)[-1])
    with pytest.raises(ValueError, match="was tuned on the grid"):
        copy.deepcopy(res.scheduler).set_timesteps(5)
    assert res.scheduler.config.tuning_info["5"]["timesteps"] == grid  # the custom grid is the config field `timesteps`
    # a multistep solver on the same custom grid (the paper pairs DPM-Solver with a log-SNR grid)
    from diffusers_timetuner.schedulers import TimeTunerDPMSolverScheduler

    dpm = calibrate(model, TimeTunerDPMSolverScheduler(), timesteps=grid, **_small())
    assert dpm.reports[5].grid == [float(t) for t in grid]


def test_custom_grid_errors_are_clear():
    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    with pytest.raises(ValueError, match="strictly descending"):
        calibrate(model, sched, timesteps=[10, 500, 900], **_small())
    with pytest.raises(ValueError, match="disagrees with the custom grid"):
        calibrate(model, sched, 4, timesteps=[900, 500, 10], **_small())
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

    class GridOnly(TimeTunerDDIMScheduler):  # a scheduler whose set_timesteps has no `timesteps` argument
        def set_timesteps(self, num_inference_steps, device=None):
            return super().set_timesteps(num_inference_steps, device)

    with pytest.raises(ValueError, match="cannot run a custom grid"):
        calibrate(model, GridOnly(clip_sample=False), timesteps=[900, 500, 10], **_small())
