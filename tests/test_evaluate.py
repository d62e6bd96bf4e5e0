"""`timetuner-evaluate` / `diffusers_timetuner.evaluation`, end to end on the bundled MNIST UNet and a bundled table.

Figures are checked against an independent computation: the bundled pipeline run by hand with diffusers' own
DDIMScheduler (untuned), the loaded tuned scheduler and a many-step DDIM teacher from the same x_T and labels.
"""
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_timetuner import evaluation, testbeds
from diffusers_timetuner.cli import evaluate as cli_evaluate
from diffusers_timetuner.evaluation import EvaluationConfig, evaluate_tuned_schedule, prepare_evaluation
from diffusers_timetuner.hub import load_tuned_scheduler
from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TABLE = "mnist-ddim-5-g1"  # bundled: DDIM@5 on the bundled MNIST UNet, taus differ from tau = t (checked below)
N, TEACHER = 6, 10  # tiny sizes: 6 samples, a 10-step teacher (enough to test the bookkeeping, not the quality)


@pytest.fixture(scope="module")
def pipe():
    return testbeds.load_mnist_pipeline()


@pytest.fixture(scope="module")
def tuned():
    return load_tuned_scheduler(TABLE)


@pytest.fixture(scope="module")
def result(pipe, tuned):
    config = EvaluationConfig(num_samples=N, teacher_steps=TEACHER, batch_size=N, grid_columns=3)
    return evaluate_tuned_schedule(pipe, tuned, config, fd_mnist=True, source=TABLE, progress=False)


def _by_hand(pipe, scheduler, steps):
    """The bundled pipeline itself, from the x_T and labels the evaluation promises: seed 0, labels 0, 1, 2, ..."""
    noise = torch.randn((N, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(N) % 10
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(class_labels=labels, latents=noise, num_inference_steps=steps, output_type="latent").images
    finally:
        pipe.scheduler = original


def test_endpoint_figures_equal_an_independent_computation(pipe, tuned, result):
    base = DDIMScheduler.from_config(pipe.scheduler.config)  # diffusers' own DDIM, no TimeTuner code
    untuned = _by_hand(pipe, base, 5)
    tuned_x = _by_hand(pipe, load_tuned_scheduler(TABLE), 5)
    teacher = _by_hand(pipe, DDIMScheduler.from_config(pipe.scheduler.config), TEACHER)
    assert not torch.allclose(untuned, tuned_x)  # the table differs from tau = t, so it changes the samples
    # the same samples (one batch of N, as by hand)
    torch.testing.assert_close(result.samples["untuned_5"], untuned, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.samples["tuned_5"], tuned_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.samples["teacher"], teacher, rtol=0, atol=1e-6)

    e_u = ((untuned.double() - teacher.double()) ** 2).flatten(1).sum(1).numpy()
    e_t = ((tuned_x.double() - teacher.double()) ** 2).flatten(1).sum(1).numpy()
    diff = e_t - e_u
    rep = result.report["step_counts"]["5"]
    assert rep["endpoint_mse_untuned"] == pytest.approx(e_u.mean(), rel=1e-4)
    assert rep["endpoint_mse_tuned"] == pytest.approx(e_t.mean(), rel=1e-4)
    assert rep["change"] == pytest.approx(diff.mean(), rel=1e-3, abs=1e-6)
    assert rep["change_se"] == pytest.approx(diff.std(ddof=1) / math.sqrt(N), rel=1e-3)
    assert rep["fraction_improved"] == pytest.approx(np.mean(e_t < e_u))
    expected = ("helps" if diff.mean() < -2 * rep["change_se"] else "does not help"
                if diff.mean() > 2 * rep["change_se"] else "cannot tell (within 2 SE)")
    assert rep["verdict"] == expected and rep["verdict_line"].startswith("n=5: ")
    # the table the report names is the bundled one
    assert rep["taus"] == pytest.approx(tuned.config["tuned_timesteps"]["5"], abs=1e-3)
    assert rep["grid"] == [800.0, 600.0, 400.0, 200.0, 0.0]


def test_fd_mnist_and_report_contents(result):
    from diffusers_timetuner.testbeds.mnist.classifier import fd_mnist

    report = result.report
    assert report["num_samples"] == N and report["labels"] == list(range(N))
    assert report["teacher"]["num_inference_steps"] == TEACHER and report["stochastic"] is False
    for name in ("teacher", "untuned_5", "tuned_5"):
        assert report["fd_mnist"][name] == pytest.approx(fd_mnist(result.samples[name].clamp(-1, 1)), rel=1e-9)
    json.dumps(report)  # JSON-able as it stands


def test_verdict_rule():
    # 2 paired standard errors either way (VERDICT_MARGIN)
    assert evaluation.verdict_for(-2.1, 1.0) == "helps"
    assert evaluation.verdict_for(2.1, 1.0) == "does not help"
    assert evaluation.verdict_for(-1.9, 1.0).startswith("cannot tell")
    assert evaluation.verdict_for(0.0, 0.0).startswith("cannot tell")  # an identity table: no change, no SE


def test_stochastic_sampler_gets_the_same_step_noise_with_and_without_the_table(pipe, tuned):
    """eta = 1: untuned and tuned draw the same step noise; an identity table (tau = t) reproduces untuned exactly,
    so any difference a real table makes is the table's, not the noise's."""
    identity = tuned.with_tuned_timesteps(5, [800.0, 600.0, 400.0, 200.0, 0.0])
    config = EvaluationConfig(num_samples=4, teacher_steps=TEACHER, eta=1.0, grid_columns=2)
    plan = prepare_evaluation(pipe, identity, config)
    assert plan.stochastic and type(plan.teacher) is DDIMScheduler  # deterministic teacher (eta = 0)
    rec = plan.sample_batch([0, 1, 2, 3])
    torch.testing.assert_close(rec["tuned_5"], rec["untuned_5"], rtol=0, atol=0)
    rec_again = plan.sample_batch([0, 1, 2, 3])
    torch.testing.assert_close(rec_again["tuned_5"], rec["tuned_5"], rtol=0, atol=0)  # seeded: reproducible


# ------------------------------------------------------------------------------------------ refusals, before sampling
@pytest.fixture
def no_sampling(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("sampling started before the table / arguments were checked")

    monkeypatch.setattr(evaluation, "sample", fail)


def test_table_for_another_model_is_refused_before_sampling(pipe, no_sampling):
    gmm_table = load_tuned_scheduler("gmm-digits-ddim-10-g1")
    with pytest.raises(ValueError, match="(?s)does not fit this pipeline.*bundled-gmm-digits"):
        prepare_evaluation(pipe, gmm_table, EvaluationConfig(num_samples=4, grid_columns=2))


def test_table_from_another_noise_schedule_is_refused_before_sampling(pipe, tuned, tmp_path, no_sampling):
    # A DDIM table calibrated for a scaled_linear noise schedule (Stable Diffusion's), saved as a folder.
    other = TimeTunerDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   tuned_timesteps={"5": [790.0, 580.0, 400.0, 199.0, 0.0]})
    other.save_pretrained(tmp_path / "other")
    loaded = load_tuned_scheduler(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="betas"):
        prepare_evaluation(pipe, loaded, EvaluationConfig(num_samples=4, grid_columns=2))
    # the console script: one error line, exit code 2, nothing written
    out = tmp_path / "out"
    argv = ["--tuned_schedule", str(tmp_path / "other"), "--pretrained_model_name_or_path", "mnist",
            "--num_samples", "4", "--grid_columns", "2", "--output_dir", str(out)]
    with pytest.raises(ValueError, match="betas"):
        cli_evaluate.main(cli_evaluate.parse_args(argv))
    assert not out.exists()


@pytest.mark.parametrize("config, match", [
    (dict(num_inference_steps=[10]), r"tables for \[5\] steps, not for \[10\]"),
    (dict(teacher_steps=5), "must exceed the largest step count"),
    (dict(teacher_steps=1001), "exceeds the 1000 training timesteps"),
    (dict(labels=[3, 10]), r"labels must lie in \[0, 9\]"),
])
def test_bad_settings_for_this_table_or_model(pipe, tuned, config, match, no_sampling):
    with pytest.raises(ValueError, match=match):
        prepare_evaluation(pipe, tuned, EvaluationConfig(num_samples=4, grid_columns=2, **config))


def test_an_untuned_diffusers_scheduler_is_refused(pipe, no_sampling):
    with pytest.raises(ValueError, match="not a TimeTuner scheduler"):
        prepare_evaluation(pipe, DDIMScheduler(), EvaluationConfig(num_samples=4, grid_columns=2))


@pytest.mark.parametrize("argv, match", [
    ([], "--tuned_schedule"),
    (["--num_samples", "1"], "num_samples must be an int >= 2"),
    (["--teacher_steps", "1"], "teacher_steps must be an int >= 2"),
    (["--guidance_scale", "nan"], "guidance_scale must be a finite number"),
    (["--eta", "-1"], "eta must be a finite number >= 0"),
    (["--batch_size", "0"], "batch_size must be a positive int"),
    (["--num_samples", "4", "--grid_columns", "5"], r"grid_columns must be an int in \[1, num_samples=4\]"),
    (["--labels", "-1"], "labels must be a non-empty list"),
    (["--num_inference_steps", "5", "5"], "distinct positive ints"),
    (["--reference_dir", "/nonexistent/folder"], "is not a folder"),
    (["--reference_dir", "mnist", "--num_samples", "3", "--grid_columns", "2"], "num_samples >= 4"),
    (["--reference_dir", "mnist", "--max_reference_images", "3"], "max_reference_images must be >= 4"),
])
def test_bad_arguments_exit_2_with_one_line(argv, match, capsys):
    full = argv if argv == [] else ["--tuned_schedule", TABLE, *argv]
    with pytest.raises(SystemExit) as exc:
        cli_evaluate.parse_args(full)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: timetuner-evaluate") and re.search(match, err), err


def test_output_dir_that_is_a_file_or_holds_a_run(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli_evaluate.parse_args(["--tuned_schedule", TABLE, "--output_dir", str(afile)])
    assert exc.value.code == 2 and "is a file" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli_evaluate.parse_args(["--tuned_schedule", TABLE, "--output_dir", str(tmp_path / "run")])
    assert "already holds an evaluation" in capsys.readouterr().err
    cli_evaluate.parse_args(["--tuned_schedule", TABLE, "--output_dir", str(tmp_path / "run"),
                             "--overwrite_output_dir"])


# ------------------------------------------------------------------------------------------ the console script
def _cli_argv(out, *extra):
    return ["--tuned_schedule", TABLE, "--num_samples", "4", "--teacher_steps", str(TEACHER), "--batch_size", "4",
            "--grid_columns", "4", "--output_dir", str(out), "--no_progress", *extra]


def test_cli_writes_report_and_grid_and_inception_figures(tmp_path):
    from PIL import Image

    from diffusers_timetuner.inception import InceptionFeatures, fid, precision_recall

    # A reference folder of 5 held-out digits written as PNG files, as a user would have them.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = cli_evaluate.load_reference("mnist", limit=5)
    for k, img in enumerate(ref):
        Image.fromarray(((img[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(ref_dir / f"{k}.png")
    out = tmp_path / "eval"
    result = cli_evaluate.main(cli_evaluate.parse_args(_cli_argv(out, "--reference_dir", str(ref_dir))))
    assert sorted(os.listdir(out)) == ["report.json", "samples_grid.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("timetuner-evaluate --tuned_schedule mnist-ddim-5-g1")
    assert set(report["versions"]) >= {"torch", "diffusers", "accelerate", "diffusers_timetuner"}
    assert report["device"] == "cpu" and report["num_processes"] == 1 and report["num_samples"] == 4
    assert report["model_id"] == testbeds.MNIST_MODEL_ID and "fd_mnist" in report  # the bundled model chosen
    # PNG round trip of [-1, 1] digits is exact at 8 bits: the folder holds the same images
    torch.testing.assert_close(evaluation.load_image_folder(str(ref_dir)), ref, rtol=0, atol=1 / 127.5)

    # Inception figures equal ones computed here from the same samples and reference folder
    feats = InceptionFeatures(progress=False)
    ref_pool, ref_spatial = feats(evaluation.load_image_folder(str(ref_dir)), spatial=True)
    pool, spatial = feats(result.samples["tuned_5"].clamp(-1, 1), spatial=True)
    got = report["inception"]["tuned_5"]
    assert got["fid"] == pytest.approx(fid(ref_pool, pool), rel=1e-9)
    assert got["sfid"] == pytest.approx(fid(ref_spatial, spatial), rel=1e-9)
    assert (got["precision"], got["recall"]) == precision_recall(ref_pool, pool, k=3)
    assert got["num_reference"] == 5

    # the grid: teacher + untuned + tuned rows of 4 digits
    grid = Image.open(out / "samples_grid.png")
    assert grid.size[0] > 4 * 28 and grid.size[1] > 3 * 28


def test_cli_default_model_is_the_testbed_the_table_names(tuned):
    gmm_table = load_tuned_scheduler("gmm-digits-ddim-10-g1")
    assert cli_evaluate.load_pipeline(None, gmm_table)[1] == testbeds.GMM_MODEL_ID
    assert cli_evaluate.load_pipeline(None, tuned)[1] == testbeds.MNIST_MODEL_ID


def test_load_image_folder_refuses_mixed_sizes_and_empty_folders(tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match="holds no images"):
        evaluation.load_image_folder(str(tmp_path))
    Image.new("L", (28, 28)).save(tmp_path / "a.png")
    Image.new("L", (32, 32)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="differ in size"):
        evaluation.load_image_folder(str(tmp_path))


# ------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_launch_matches_one_process(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) on examples/evaluate.py: the samples are split, gathered, and
    the main process alone writes the same figures as a one-process run of the console script."""
    accelerate = shutil.which("accelerate")
    assert accelerate is not None, "the `accelerate` launcher is not on PATH"
    one, two = tmp_path / "one", tmp_path / "two"
    cli_evaluate.main(cli_evaluate.parse_args(_cli_argv(one, "--num_samples", "5", "--grid_columns", "2",
                                                        "--batch_size", "2")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
              os.path.join(ROOT, "examples", "evaluate.py"),
              *_cli_argv(two, "--num_samples", "5", "--grid_columns", "2", "--batch_size", "2", "--cpu")]
    run = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Evaluating on 2 process(es)" in run.stdout
    assert sorted(os.listdir(two)) == ["report.json", "samples_grid.png"]
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r2["num_processes"] == 2 and r1["num_processes"] == 1
    for key in ("endpoint_mse_untuned", "endpoint_mse_tuned", "change", "change_se"):
        # the same x_T per sample index whatever the split; batches differ, so float round-off only
        assert r2["step_counts"]["5"][key] == pytest.approx(r1["step_counts"]["5"][key], rel=1e-4, abs=1e-6), key
    assert r2["fd_mnist"]["tuned_5"] == pytest.approx(r1["fd_mnist"]["tuned_5"], rel=1e-3)


def test_console_script_is_declared_and_says_why_it_refuses(tmp_path, monkeypatch, capsys):
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'timetuner-evaluate = "diffusers_timetuner.cli.evaluate:cli"' in pyproject
    monkeypatch.setattr(evaluation, "sample", lambda *a, **k: pytest.fail("sampled before refusing the table"))
    monkeypatch.setattr(sys, "argv", ["timetuner-evaluate", "--tuned_schedule", "gmm-digits-ddim-10-g1",
                                      "--pretrained_model_name_or_path", "mnist", "--num_samples", "4",
                                      "--grid_columns", "2", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exc:
        cli_evaluate.cli()
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("timetuner-evaluate: error: gmm-digits-ddim-10-g1 does not fit")
