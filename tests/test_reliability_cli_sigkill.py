"""SIGKILL at any point of a whole CLI run (timetuner-calibrate --overwrite_output_dir over an earlier result) leaves
the old result or the new one in the output folder, never neither and never half; a run killed mid-calibration
continues with --resume_from_checkpoint to the table an uninterrupted run gives.

Each run is `main(parse_args(argv))` in a child process forked from a forkserver that imported the CLI once (no
per-run import cost). The kill points are observable events, polled every millisecond: the run's first log line
(model loaded, no step taken), a checkpoint after the first step, the temporary result folder appearing beside the
output (writing), the new config in the output folder (written).
"""

import glob
import json
import multiprocessing
import os
import sys
import time

import pytest

from diffusers_timetuner.cli import calibrate as cli

SIZES = ["--pretrained_model_name_or_path", "gmm", "--num_samples", "16", "--batch_size", "8",
         "--num_validation_samples", "8", "--num_heldout_samples", "8", "--no_progress", "--cpu"]
OLD_N, NEW_N = "3", "8"  # the old result is a table for 3 steps, the new run calibrates 8
TIMEOUT = 60.0
HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def run_cli(argv, log_path):
    """Child process: the whole CLI run, its log into `log_path`."""
    import torch

    torch.set_num_threads(1)
    sys.stderr = open(log_path, "w", buffering=1)
    print(f"running {cli.__file__}", file=sys.stderr)
    cli.main(cli.parse_args(argv))


@pytest.fixture(scope="module")
def ctx():
    # the forkserver imports with its environment's path (not this process's sys.path): this checkout's src first
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([SRC, HERE, *([saved] if saved else [])])
    context = multiprocessing.get_context("forkserver")
    # everything a run imports, once: accelerate, transformers (the argument parser), the library, the plot
    context.set_forkserver_preload(["torch", "accelerate", "transformers", "diffusers", "matplotlib.pyplot",
                                    "diffusers_timetuner.calibration", "diffusers_timetuner.testbeds",
                                    "diffusers_timetuner.cli.calibrate"])
    yield context
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def old_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("old") / "run"
    cli.main(cli.parse_args([*SIZES, "--num_inference_steps", OLD_N, "--output_dir", str(out)]))
    return out


def _copy_old(old_result, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(old_result, out)
    return out


def _which_result(folder) -> str:
    """'old' or 'new' when `folder` holds one whole result (config, report and plot of the same run); fails on
    anything else."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert files == ["calibration.png", "report.json", "scheduler_config.json"], files
    config = json.loads((folder / "scheduler_config.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    steps = sorted(config["tuned_timesteps"])
    assert steps == sorted(report["step_counts"]) and len(steps) == 1, (steps, sorted(report["step_counts"]))
    n = steps[0]
    assert config["tuned_timesteps"][n] == pytest.approx(report["step_counts"][n]["taus"], abs=1e-6)
    assert (folder / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return {OLD_N: "old", NEW_N: "new"}[n]


def _start(ctx, out, tmp_path, *extra):
    argv = [*SIZES, "--num_inference_steps", NEW_N, "--output_dir", str(out), *extra]
    log = tmp_path / "log.txt"
    proc = ctx.Process(target=run_cli, args=(argv, str(log)))
    proc.start()
    return proc, log


def _kill_when(proc, event, what):
    deadline = time.time() + TIMEOUT
    while not event():
        # a run that ended between two polls may have ended just after the event: look once more
        assert proc.is_alive() or event(), f"the run ended before {what} (exit code {proc.exitcode})"
        assert time.time() < deadline, f"no {what} within {TIMEOUT} s"
        time.sleep(0.001)
    proc.kill()  # SIGKILL
    proc.join(TIMEOUT)


def _ran_this_checkout(log):
    first = log.read_text().splitlines()[0]
    assert first == f"running {os.path.realpath(cli.__file__)}" or first == f"running {cli.__file__}", first


def _log_has(log, text):
    return lambda: log.exists() and text in log.read_text()


def _checkpoint_after_first_step(out):
    def event():
        path = out / "checkpoints" / f"steps_{NEW_N}.json"
        return path.exists() and json.loads(path.read_text())["state"]["next_step"] >= 1  # written atomically

    return event


def test_killed_before_the_first_step_keeps_the_old_result(ctx, old_result, tmp_path):
    out = _copy_old(old_result, tmp_path)
    proc, log = _start(ctx, out, tmp_path, "--overwrite_output_dir")
    _kill_when(proc, _log_has(log, "timetuner-calibrate on 1 process(es)"), "the first log line")  # model loaded
    assert proc.exitcode == -9
    _ran_this_checkout(log)
    assert _which_result(out) == "old"


def test_killed_mid_calibration_keeps_the_old_result_and_resumes_to_the_uninterrupted_table(ctx, old_result,
                                                                                           tmp_path):
    out = _copy_old(old_result, tmp_path)
    proc, log = _start(ctx, out, tmp_path, "--overwrite_output_dir")
    _kill_when(proc, _checkpoint_after_first_step(out), "checkpoint after the first step")
    assert proc.exitcode == -9
    _ran_this_checkout(log)
    assert _which_result(out) == "old"
    killed_at = json.loads((out / "checkpoints" / f"steps_{NEW_N}.json").read_text())["state"]["next_step"]
    assert 1 <= killed_at < int(NEW_N)

    resumed = cli.main(cli.parse_args([*SIZES, "--num_inference_steps", NEW_N, "--output_dir", str(out),
                                       "--resume_from_checkpoint"]))
    assert _which_result(out) == "new" and not (out / "checkpoints").exists()
    reference = cli.main(cli.parse_args([*SIZES, "--num_inference_steps", NEW_N, "--output_dir",
                                         str(tmp_path / "uninterrupted")]))
    assert resumed.tables == reference.tables  # bit for bit


def test_killed_while_writing_keeps_the_old_result(ctx, old_result, tmp_path):
    out = _copy_old(old_result, tmp_path)
    proc, log = _start(ctx, out, tmp_path, "--overwrite_output_dir")
    _kill_when(proc, lambda: bool(glob.glob(str(tmp_path / ".run.tmp-*"))), "temporary result folder")
    assert proc.exitcode == -9
    _ran_this_checkout(log)
    assert glob.glob(str(tmp_path / ".run.tmp-*"))  # the kill landed before the swap: the half-written folder is left
    assert _which_result(out) == "old"


def test_killed_after_writing_has_the_new_result(ctx, old_result, tmp_path):
    out = _copy_old(old_result, tmp_path)
    proc, log = _start(ctx, out, tmp_path, "--overwrite_output_dir")

    def new_config_in_place():
        try:
            return NEW_N in json.loads((out / "scheduler_config.json").read_text())["tuned_timesteps"]
        except FileNotFoundError:  # never: the folder is exchanged in one step
            return False

    _kill_when(proc, new_config_in_place, "new config in the output folder")
    assert proc.exitcode in (-9, 0)  # killed while removing its checkpoints / logging, or just done
    _ran_this_checkout(log)
    assert _which_result(out) == "new"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".run.old-")]
