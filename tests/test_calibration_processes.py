"""Calibration across processes: the CLI, SIGKILL + resume, and a real two-process Accelerate run (CPU)."""

import json
import os
import shutil
import socket
import signal
import subprocess
import sys
import time

import pytest

from test_calibration_helpers import GaussianEps, ddim, tiny_unet

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "test_calibration_worker.py")
SRC = os.path.join(os.path.dirname(HERE), "src")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, HERE, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    """An unconditional tiny UNet + DDIM scheduler saved as a Diffusers pipeline folder (no download)."""
    from diffusers import DDIMScheduler, DDPMPipeline

    path = tmp_path_factory.mktemp("tiny_pipe")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(path)
    return str(path)


def _cli_args(model_dir, out_dir, *extra):
    return ["--pretrained_model_name_or_path", model_dir, "--output_dir", str(out_dir), "--num_inference_steps", "3",
            "--num_samples", "8", "--batch_size", "4", "--num_validation_samples", "4", "--num_heldout_samples", "4",
            "--no_progress", *extra]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_a_loadable_config_report_and_plot(tiny_pipeline_dir, tmp_path):
    from diffusers_timetuner.cli.calibrate import main, parse_args
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

    out = tmp_path / "run"
    res = main(parse_args(_cli_args(tiny_pipeline_dir, out, "--num_inference_steps", "2", "3")))
    # per-step checkpoints are removed once the run has finished
    assert sorted(os.listdir(out)) == ["calibration.png", "report.json", "scheduler_config.json"]
    loaded = TimeTunerDDIMScheduler.from_pretrained(out)
    for n in (2, 3):
        loaded.set_timesteps(n)
        assert loaded.timesteps.tolist() == pytest.approx(res.tables[n], abs=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("timetuner-calibrate ")
    assert set(report["versions"]) >= {"torch", "diffusers", "accelerate", "diffusers_timetuner"}
    step = report["step_counts"]["3"]["steps"][0]
    assert {"t", "tau", "loss_before", "loss_after", "forward_samples", "seconds"} <= set(step)
    held = report["step_counts"]["3"]["heldout"]
    assert {"endpoint_mse_tuned", "endpoint_mse_untuned", "trajectory_mse_tuned"} <= set(held)

    with pytest.raises(ValueError, match="already holds a calibration run"):
        main(parse_args(_cli_args(tiny_pipeline_dir, out)))
    main(parse_args(_cli_args(tiny_pipeline_dir, out, "--overwrite_output_dir")))


def test_cli_calibrates_a_custom_grid(tiny_pipeline_dir, tmp_path):
    from diffusers_timetuner.cli.calibrate import main, parse_args
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

    out = tmp_path / "grid"
    args = [a for a in _cli_args(tiny_pipeline_dir, out) if a not in ("--num_inference_steps", "3")]
    res = main(parse_args([*args, "--timesteps", "999", "600", "200"]))
    loaded = TimeTunerDDIMScheduler.from_pretrained(out)
    loaded.set_timesteps(timesteps=[999, 600, 200])
    assert loaded.grid_timesteps.tolist() == [999, 600, 200]
    assert loaded.timesteps.tolist() == pytest.approx(res.tables[3], abs=1e-4)


def test_cli_errors(tiny_pipeline_dir, tmp_path):
    from diffusers_timetuner.cli.calibrate import main, parse_args

    with pytest.raises(ValueError, match="Unknown scheduler"):
        main(parse_args(_cli_args(tiny_pipeline_dir, tmp_path / "a", "--scheduler", "pndm")))
    with pytest.raises(ValueError, match="unconditional"):
        main(parse_args(_cli_args(tiny_pipeline_dir, tmp_path / "b", "--guidance_scale", "2")))
    with pytest.raises(ValueError, match="no `data` was given"):
        main(parse_args(_cli_args(tiny_pipeline_dir, tmp_path / "c", "--strategy", "parallel",
                                  "--objective", "paper")))


def test_cli_user_errors_are_one_line_and_exit_2_before_the_model_loads(tiny_pipeline_dir, tmp_path, capsys):
    from diffusers_timetuner.cli.calibrate import parse_args

    for extra, message in [(["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
                           (["--push_to_hub", "--hub_model_id", "org/.."], "not a valid Hub repo id"),
                           (["--num_inference_steps", "-3"], "num_inference_steps must be positive integers"),
                           (["--guard_margin", "inf"], "guard_margin must be a finite number")]:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(_cli_args(tiny_pipeline_dir, tmp_path / "d", *extra))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_python_dash_m_entry_point_runs(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "diffusers_timetuner.cli.calibrate",
                           *_cli_args(tiny_pipeline_dir, out)], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "scheduler_config.json").exists()
    assert "timetuner-calibrate on 1 process(es)" in proc.stderr
    assert "n=3 step 0: t=" in proc.stderr  # the library's per-step lines reach the console
    assert "held-out endpoint_mse" in proc.stderr and "+/- " in proc.stderr  # verdict metric and its paired SE


# ------------------------------------------------------------------------------------------------ SIGKILL + resume
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_table(tmp_path):
    ref_out, out = tmp_path / "ref.json", tmp_path / "resumed.json"
    ckpt = tmp_path / "ckpt"
    from test_calibration_worker import resume_job

    resume_job(str(tmp_path / "ref_ckpt"), str(ref_out), 0.0)  # uninterrupted reference, in this process

    # 5 ms per network call: the 12-step run takes several seconds, long enough to be killed mid-way.
    proc = subprocess.Popen([sys.executable, WORKER, "resume", str(ckpt), str(out), "0.005"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = ckpt / "steps_12.json"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            try:
                done = json.loads(path.read_text())["state"]["next_step"]
            except (json.JSONDecodeError, KeyError):  # never happens with atomic writes; keep polling if it did
                done = 0
            if done >= 3:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    killed_at = json.loads(path.read_text())["state"]["next_step"]
    assert 3 <= killed_at < 12

    resumed = subprocess.run([sys.executable, WORKER, "resume", str(ckpt), str(out), "0"], env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(out.read_text()) == json.loads(ref_out.read_text())  # bit for bit
    leftovers = [f for f in os.listdir(ckpt) if f.startswith(".tmp")]
    assert leftovers == []


def test_resume_with_other_settings_is_refused(tmp_path):
    from diffusers_timetuner.calibration import calibrate

    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    kw = dict(num_samples=4, batch_size=4, num_validation_samples=2, num_heldout_samples=2, sample_shape=(1, 2, 2),
              checkpoint_dir=str(tmp_path), progress=False)
    calibrate(model, sched, 3, **kw)
    with pytest.raises(ValueError, match="other settings"):
        calibrate(model, sched, 3, seed=1, **kw)


# ------------------------------------------------------------------------------------------------ two processes
def test_two_process_accelerate_run_matches_one_process(tmp_path):
    """docs/facts.md, 3: this launch line really starts two CPU processes (gloo). Each process holds the same table,
    equal to a one-process run within the search tolerance (0.5 timestep); only the main process writes."""
    from test_calibration_worker import DIST_STEPS, dist_job

    accelerate = shutil.which("accelerate")
    assert accelerate is not None, "the `accelerate` launcher is not on PATH"
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    dist_job(str(one_dir))  # one process, in this test process
    # A free port rather than the default 29500, which another distributed job on the machine may hold.
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
              WORKER, "dist", str(two_dir)]
    double = subprocess.run(launch, env=_env(), capture_output=True, text=True, timeout=180)
    assert double.returncode == 0, double.stderr[-3000:]

    one = json.loads((one_dir / "tables.0.json").read_text())
    rank0 = json.loads((two_dir / "tables.0.json").read_text())
    rank1 = json.loads((two_dir / "tables.1.json").read_text())
    assert rank0 == rank1  # every process holds the same table (decisions broadcast from the main process)
    for n in map(str, DIST_STEPS):
        diff = max(abs(a - b) for a, b in zip(one[n], rank0[n]))
        print(f"n={n}: max |tau(1 process) - tau(2 processes)| = {diff:.3g}")
        # Losses are float64 sums of per-sample float64 losses, so both runs take the same search path up to
        # round-off (measured: identical tables); the stated tolerance is the search's own resolution, 0.5.
        assert diff <= 0.5, (one[n], rank0[n])
    report = json.loads((two_dir / "run" / "report.json").read_text())
    assert report["num_processes"] == 2 and report["settings"]["num_processes"] == 2
    assert sorted(os.listdir(two_dir / "run")) == ["calibration.png", "report.json", "scheduler_config.json"]


def test_cli_loads_the_bundled_testbeds_by_short_name_or_id():
    from diffusers_timetuner import testbeds
    from diffusers_timetuner.cli.calibrate import load_model

    pipe, model_id = load_model("gmm")
    assert model_id == testbeds.GMM_MODEL_ID and isinstance(pipe.unet, testbeds.GaussianMixtureDenoiser)
    assert load_model(testbeds.GMM_MODEL_ID)[1] == testbeds.GMM_MODEL_ID
    assert load_model("mnist")[1] == load_model(None)[1] == testbeds.MNIST_MODEL_ID


def test_every_config_field_is_recorded_and_an_old_checkpoint_is_refused_by_name(tmp_path):
    """The report's settings, each table's tuning_info and the checkpoint fingerprint are built from
    dataclasses.asdict(CalibrationConfig): a new field is recorded without extra code. A checkpoint whose fingerprint
    has other keys (as one written before that change: `custom_grid`, no `timesteps`) is refused naming them."""
    import dataclasses

    from diffusers_timetuner.calibration import CalibrationConfig, calibrate

    sched = ddim()
    model = GaussianEps(sched.alphas_cumprod)
    kw = dict(num_samples=4, batch_size=4, num_validation_samples=2, num_heldout_samples=2, sample_shape=(1, 2, 2),
              checkpoint_dir=str(tmp_path), progress=False)
    res = calibrate(model, sched, 3, **kw)
    fields = {f.name for f in dataclasses.fields(CalibrationConfig)}
    assert fields <= set(res.settings) and fields <= set(res.scheduler.config.tuning_info["3"])
    assert res.settings["num_inference_steps"] == [3] and res.settings["timesteps"] is None
    path = tmp_path / "steps_3.json"
    payload = json.loads(path.read_text())
    payload["fingerprint"]["custom_grid"] = payload["fingerprint"].pop("timesteps")
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"differs in: custom_grid, timesteps\)"):
        calibrate(model, sched, 3, **kw)
