"""A calibration result appears in its folder completely or not at all; the previous result survives any failure."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from diffusers_timetuner.calibration import api
from diffusers_timetuner.calibration.api import CalibrationResult
from diffusers_timetuner.calibration.checkpoint import atomic_output_dir, atomic_write_json
from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler

OLD = {"scheduler_config.json": "old config", "report.json": "old report", "calibration.png": "old png"}


def _old_result(folder):
    folder.mkdir()
    for name, text in OLD.items():
        (folder / name).write_text(text)
    (folder / "notes.txt").write_text("user file")


def _contents(folder):
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file()}


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def _result():
    sched = TimeTunerDDIMScheduler(tuned_timesteps={"2": [740.5, 3.5]})
    return CalibrationResult(scheduler=sched, reports={}, settings={"objective": "test"})


def test_save_failing_in_the_plot_leaves_the_old_result(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _old_result(out)

    def broken_plot(path, reports):
        raise RuntimeError("disk full while writing the plot")

    monkeypatch.setattr(api, "plot_report", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        _result().save(str(out))
    assert _contents(out) == {**OLD, "notes.txt": "user file"}  # not the new config + report without a plot
    assert _leftovers(tmp_path) == []


def test_save_failing_into_a_new_folder_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "plot_report", lambda path, reports: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _result().save(str(tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_the_result_and_keeps_other_files(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _old_result(out)
    monkeypatch.setattr(api, "plot_report", lambda path, reports: open(path, "w").write("new png"))
    _result().save(str(out))
    files = _contents(out)
    assert files["calibration.png"] == "new png" and files["notes.txt"] == "user file"
    assert TimeTunerDDIMScheduler.from_pretrained(str(out)).config.tuned_timesteps == {"2": [740.5, 3.5]}
    assert _leftovers(tmp_path) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the mode os.makedirs gives, not mkdtemp's private 0o700


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_json_gets_the_mode_a_plain_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
        atomic_write_json(str(tmp_path / "report.json"), {"a": 1})
        atomic_write_json(str(tmp_path / "report.json"), {"a": 2})  # replacing keeps it so
    finally:
        os.umask(old)
    mode = (tmp_path / "report.json").stat().st_mode & 0o777
    # 0o666 & ~umask (0o644 / 0o640), not mkstemp's private 0o600
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "report.json").read_text().strip().endswith("}") and _leftovers(tmp_path) == []


def test_overwrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "run"
    _old_result(out)
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        with open(os.path.join(tmp, "report.json"), "w") as f:
            f.write("new report")
    assert _contents(out) == {"report.json": "new report"}


def test_output_path_that_is_a_file_is_refused_before_writing(tmp_path):
    target = tmp_path / "run"
    target.write_text("a file")
    with pytest.raises(ValueError, match="exists and is a file"):
        with atomic_output_dir(str(target)):
            raise AssertionError("the block must not run")
    assert target.read_text() == "a file"


KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from diffusers_timetuner.calibration import checkpoint
    out, point = sys.argv[1], sys.argv[2]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "after_swap":  # the new folder is in place, the old one not yet deleted
        shutil.rmtree = lambda *a, **k: die()
    with checkpoint.atomic_output_dir(out, overwrite=True) as tmp:
        if point == "before_writing":
            die()
        for name in ("scheduler_config.json", "report.json"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("new " + name)
        if point == "half_written":
            die()
        with open(os.path.join(tmp, "calibration.png"), "w") as f:
            f.write("new calibration.png")
        if point == "written":
            die()
    """
)


@pytest.mark.parametrize(
    "point, expect_new",
    [("before_writing", False), ("half_written", False), ("written", False), ("after_swap", True)],
)
def test_sigkill_leaves_the_old_or_the_new_result_never_half(tmp_path, point, expect_new):
    out = tmp_path / "run"
    _old_result(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src")]
                                                       + [os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), point], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    files = _contents(out)
    if expect_new:
        assert files == {n: f"new {n}" for n in OLD}
    else:
        assert files == {**OLD, "notes.txt": "user file"}


@pytest.mark.parametrize("bad", [["--num_inference_steps", "-3"], ["--num_heldout_samples", "-2"]])
def test_cli_overwrite_keeps_the_old_result_when_the_new_run_fails(tmp_path, bad):
    from diffusers_timetuner.cli.calibrate import main, parse_args

    out = tmp_path / "run"
    _old_result(out)
    args = ["--pretrained_model_name_or_path", "gmm", "--output_dir", str(out), "--overwrite_output_dir", "--cpu",
            "--num_samples", "4", "--batch_size", "4", "--num_validation_samples", "4", "--no_progress", *bad]
    with pytest.raises(SystemExit):  # refused by the argument check, before the folder is touched
        main(parse_args(args))
    assert _contents(out) == {**OLD, "notes.txt": "user file"}


def test_cli_output_dir_that_is_a_file_fails_before_calibrating(tmp_path, monkeypatch):
    from diffusers_timetuner.cli import calibrate as cli

    target = tmp_path / "run"
    target.write_text("a file")
    monkeypatch.setattr(cli, "load_model", lambda path: pytest.fail("the model must not be loaded"))
    with pytest.raises(ValueError, match="is a file"):
        cli.main(cli.parse_args(["--output_dir", str(target), "--cpu", "--no_progress"]))
