"""The tau table travels in the scheduler config as plain JSON (save/load, from_config, plain schedulers)."""
import inspect
import json
import logging

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils import logging as diffusers_logging

from diffusers_timetuner.schedulers import (
    TimeTunerDDIMScheduler,
    TimeTunerDDPMScheduler,
    TimeTunerDPMSolverScheduler,
    TimeTunerDPMSolverSinglestepScheduler,
    TimeTunerEulerDiscreteScheduler,
)

# Non-default values for parent keys: if a subclass dropped a parent key (the `**kwargs` signature trap,
# docs/facts.md, 2), from_config would silently rebuild it with the default and the comparison would fail.
CASES = {
    "ddim": (
        TimeTunerDDIMScheduler,
        DDIMScheduler,
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
             set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing",
             rescale_betas_zero_snr=True, clip_sample_range=2.0, num_train_timesteps=500),
    ),
    "ddpm": (
        TimeTunerDDPMScheduler,
        DDPMScheduler,
        dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", clip_sample=False,
             prediction_type="sample", timestep_spacing="trailing", steps_offset=1, num_train_timesteps=500),
    ),
    "dpm": (
        TimeTunerDPMSolverScheduler,
        DPMSolverMultistepScheduler,
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_order=3,
             prediction_type="v_prediction", algorithm_type="sde-dpmsolver++", solver_type="heun",
             lower_order_final=False, euler_at_final=True, final_sigmas_type="sigma_min", timestep_spacing="leading",
             steps_offset=1, num_train_timesteps=500),
    ),
    "dpm_single": (
        TimeTunerDPMSolverSinglestepScheduler,
        DPMSolverSinglestepScheduler,
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_order=3,
             prediction_type="v_prediction", solver_type="heun", lower_order_final=True,
             final_sigmas_type="sigma_min", num_train_timesteps=500),
    ),
    "euler": (
        TimeTunerEulerDiscreteScheduler,
        EulerDiscreteScheduler,
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
             interpolation_type="log_linear", timestep_spacing="leading", steps_offset=1,
             final_sigmas_type="sigma_min", num_train_timesteps=500),
    ),
}
NEW_KEYS = {"tuned_timesteps", "tuned_grids", "tuning_info"}


def fake_model(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.3 * x * torch.cos(t / 300.0) + 0.1 * torch.sin(t / 70.0 + x)


def sample(sched, n):
    sched.set_timesteps(n)
    x = torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    gen = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        kwargs = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
        x = sched.step(fake_model(x_in, t), t, x, **kwargs).prev_sample
    return x


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def tuned_for(parent_cls, config, n=4, shift=2.5):
    """A table with tau != t on the grid this config produces (taus inside the training range)."""
    parent = parent_cls(**config)
    parent.set_timesteps(n)
    grid = parent.timesteps.tolist()
    return {n: [t + shift if t + shift <= config["num_train_timesteps"] - 1 else t - shift for t in grid]}, grid


@pytest.mark.parametrize("name", list(CASES))
def test_from_config_keeps_every_parent_key(name):
    ours_cls, parent_cls, config = CASES[name]
    plain = parent_cls(**config)
    ours = ours_cls.from_config(plain.config)
    assert {k: v for k, v in public(ours.config).items() if k not in NEW_KEYS} == public(plain.config)
    assert ours.config.tuned_timesteps is None and torch.equal(ours.betas, plain.betas)
    assert torch.equal(sample(ours, 4), sample(parent_cls.from_config(plain.config), 4))


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_round_trip_gives_identical_outputs(name, tmp_path):
    ours_cls, parent_cls, config = CASES[name]
    table, grid = tuned_for(parent_cls, config)
    sched = ours_cls(**config, tuned_timesteps=table, tuned_grids={4: grid}, tuning_info={4: {"objective": "paper"}})
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = ours_cls.from_pretrained(tmp_path, subfolder="scheduler")
    assert public(loaded.config) == public(sched.config)
    out = sample(sched, 4)
    assert torch.equal(sample(loaded, 4), out)
    assert not torch.equal(out, sample(parent_cls(**config), 4))  # the table does change the result
    # The JSON holds plain values: string keys, lists of numbers, no tensors.
    raw = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert raw["_class_name"] == ours_cls.__name__
    assert list(raw["tuned_timesteps"]) == ["4"] and all(isinstance(v, float) for v in raw["tuned_timesteps"]["4"])
    assert raw["tuned_grids"] == {"4": grid} and raw["tuning_info"] == {"4": {"objective": "paper"}}


def test_int_keys_are_strings_in_memory_and_on_disk(tmp_path):
    sched = TimeTunerDDIMScheduler(tuned_timesteps={4: torch.tensor([760.25, 505.5, 245.75, 3.5])})
    assert sched.config.tuned_timesteps == {"4": [760.25, 505.5, 245.75, 3.5]}
    sched.save_config(tmp_path)
    text = (tmp_path / "scheduler_config.json").read_text()
    assert "tensor" not in text.lower()
    assert json.loads(text)["tuned_timesteps"] == {"4": [760.25, 505.5, 245.75, 3.5]}


@pytest.mark.parametrize("name", list(CASES))
def test_plain_scheduler_loads_our_config_with_a_warning(name, tmp_path, caplog):
    ours_cls, parent_cls, config = CASES[name]
    table, _ = tuned_for(parent_cls, config)
    ours_cls(**config, tuned_timesteps=table).save_config(tmp_path)
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            plain = parent_cls.from_pretrained(tmp_path)
    finally:
        diffusers_logging.disable_propagation()
    assert "tuned_timesteps" in caplog.text and "are not expected and will be ignored" in caplog.text
    assert type(plain) is parent_cls
    # Diffusers keeps the unknown keys in the plain scheduler's config (unused), so re-saving it keeps the table.
    assert {k: v for k, v in public(plain.config).items() if k not in NEW_KEYS} == public(parent_cls(**config).config)
    assert plain.config.tuned_timesteps == {str(k): v for k, v in table.items()}
    assert torch.equal(sample(plain, 4), sample(parent_cls(**config), 4))  # the plain, untuned sampler


def test_untuned_config_round_trips_unchanged(tmp_path):
    sched = TimeTunerDDIMScheduler(tuned_timesteps={})
    sched.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert raw["tuned_timesteps"] == {} and raw["tuned_grids"] is None and raw["tuning_info"] is None
    assert TimeTunerDDIMScheduler.from_pretrained(tmp_path).config.tuned_timesteps == {}


def test_loading_a_bad_table_fails_clearly(tmp_path):
    TimeTunerDDIMScheduler().save_config(tmp_path)
    raw = json.loads((tmp_path / "scheduler_config.json").read_text())
    raw["tuned_timesteps"] = {"4": [900.0, 600.0, 300.0]}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="has 3 values but 4 inference steps"):
        TimeTunerDDIMScheduler.from_pretrained(tmp_path)


# --- CalibrationConfig: the one spelling of every calibration setting -------------------------------------------


def test_cli_exposes_every_calibration_config_field():
    import dataclasses

    from diffusers_timetuner.calibration import CalibrationConfig
    from diffusers_timetuner.cli.calibrate import build_parser

    options = {s for a in build_parser()._actions for s in a.option_strings}
    missing = [f.name for f in dataclasses.fields(CalibrationConfig) if f"--{f.name}" not in options]
    assert not missing, f"CalibrationConfig fields without a CLI option: {missing}"


def test_cli_args_give_the_api_config_with_the_same_overrides():
    from diffusers_timetuner.calibration import CPU_QUICK_PRESET, CalibrationConfig
    from diffusers_timetuner.cli.calibrate import parse_args

    argv = ["--num_inference_steps", "5", "10", "--objective", "endpoint", "--optimizer", "adam", "--adam_steps",
            "7", "--guidance_scale", "2.5", "--num_samples", "12", "--no_guard", "--guard_margin", "0",
            "--validation_metric", "energy_distance", "--eta", "0.5", "--seed", "3", "--teacher_steps", "40"]
    overrides = dict(num_inference_steps=[5, 10], objective="endpoint", optimizer="adam", adam_steps=7,
                     guidance_scale=2.5, num_samples=12, guard=False, guard_margin=0.0,
                     validation_metric="energy_distance", eta=0.5, seed=3, teacher_steps=40)
    # the CLI's default preset is the CPU sizes; explicit options win over it
    assert parse_args(argv).config == CalibrationConfig().replace(**{**CPU_QUICK_PRESET, **overrides})
    # --preset none: the library's own defaults
    assert parse_args(argv + ["--preset", "none"]).config == CalibrationConfig(**overrides)


def test_no_argument_cli_is_the_measured_main_job():
    """The README's main job: the bundled flow-matching MNIST UNet, its Euler sampler (auto), tau tuned (the library's
    default), on 128 / 128 / 256 / 256 samples (calibration, batch, validation, held-out) against a 40-step teacher,
    the sizes measured to clear the 2-SE held-out bar in about a minute of 2 CPU cores (calibration/config.py,
    CPU_QUICK_PRESET); the library's defaults are 64 / 64 / 32 / 64 and the teacher's own default."""
    from diffusers_timetuner.calibration import CalibrationConfig
    from diffusers_timetuner.cli.calibrate import parse_args

    args = parse_args([])
    assert (args.pretrained_model_name_or_path, args.scheduler) == ("mnist_flow", "auto")
    cfg = args.config
    assert cfg.tune == "tau" and cfg.num_inference_steps is None  # the paper's tau table, 10 steps
    sizes = (cfg.num_samples, cfg.batch_size, cfg.num_validation_samples, cfg.num_heldout_samples)
    assert sizes == (128, 128, 256, 256)
    api = CalibrationConfig()
    assert (api.num_samples, api.batch_size, api.num_validation_samples, api.num_heldout_samples) == (64, 64, 32, 64)
    assert cfg.teacher_steps == 40 and api.teacher_steps is None
    assert dataclasses_equal_except(cfg, api, {"num_samples", "batch_size", "num_validation_samples",
                                               "num_heldout_samples", "teacher_steps"})


def test_auto_scheduler_is_flow_euler_for_a_flow_model_and_ddim_otherwise():
    from diffusers_timetuner.cli.calibrate import load_model, scheduler_for

    flow, _ = load_model("mnist_flow")
    eps, _ = load_model("gmm")
    assert scheduler_for("auto", flow) == "flow_euler"
    assert scheduler_for("auto", eps) == "ddim"
    assert scheduler_for("dpmsolver", flow) == "dpmsolver"  # an explicit choice is kept


def test_run_ends_with_the_held_out_verdict_in_paired_standard_errors():
    from types import SimpleNamespace

    from diffusers_timetuner.cli.calibrate import result_lines

    # made-up figures: a difference of -0.25 with a paired SE of 0.05 is 5 SE better
    heldout = {"metric": "endpoint_mse", "num_samples": 256, "untuned": 0.75, "tuned": 0.5, "change_se": 0.05,
               "relative_change": -1 / 3}
    rep = SimpleNamespace(taus=[995.3, 1.0], heldout=heldout, forward_samples=100, seconds=1.0)
    taus, verdict = result_lines(SimpleNamespace(reports={2: rep}))
    assert taus == "n=2: taus [995.3, 1.0]"
    assert "on 256 x_T: untuned 0.75 -> tuned 0.5 (-33.3%, difference -0.25 +/- 0.05 paired SE; 5.0 SE better)" \
        in verdict


def dataclasses_equal_except(a, b, names) -> bool:
    import dataclasses

    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: v for k, v in da.items() if k not in names} == {k: v for k, v in db.items() if k not in names}


def test_calibration_config_refuses_an_unknown_setting():
    import pytest

    from diffusers_timetuner.calibration import CalibrationConfig

    with pytest.raises(ValueError, match="num_sample"):
        CalibrationConfig().replace(num_sample=3)
