"""The bundled tuned_schedules/: index up to date, every entry loads / matches its grid / reproduces its metric, and
the folder ships in a wheel (built here from a copy of the source tree) and is found from the unpacked wheel."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hub_server.outputs import make_calibration_output, sample, tiny_pipeline, tuned_scheduler

from diffusers_timetuner import hub

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = hub.list_bundled_schedules()
FIXTURE = "<fixture entry>"
ENDPOINT_TEACHER_STEPS = 50


def test_bundled_dir_is_the_package_data_folder():
    """One location, no symlink: the entries are package data in the source tree."""
    where = hub.bundled_schedules_dir()
    assert where == REPO_ROOT / "src" / "diffusers_timetuner" / "tuned_schedules"
    assert not where.is_symlink()


def test_index_is_up_to_date():
    """tuned_schedules/README.md must equal what `python -m diffusers_timetuner.hub --write-index` generates."""
    on_disk = (hub.bundled_schedules_dir() / hub.INDEX_NAME).read_text()
    assert on_disk == hub.render_bundled_index(), "run: PYTHONPATH=src python -m diffusers_timetuner.hub --write-index"


def test_bundled_set_is_not_empty():
    assert BUNDLED, "tuned_schedules/ has no entries"


# -- per-entry checks ----------------------------------------------------------------------------------------------
def tiny_endpoint_mse(scheduler, n: int) -> float:
    """Metric of the fixture entry: mean squared distance between the n-step samples of the tiny seeded pipeline
    (tests/hub_server/outputs.py) and a 50-step untuned DDIM teacher from the same noise (seed 0, batch 2)."""
    from diffusers import DDIMScheduler

    pipe = tiny_pipeline()
    teacher = sample(pipe, DDIMScheduler.from_config(scheduler.config), ENDPOINT_TEACHER_STEPS)
    return float(((sample(pipe, scheduler, n) - teacher) ** 2).mean())


def _load_build_script():
    """tuned_schedules/build.py: the script that built the entries, holding the held-out recompute recipe."""
    spec = importlib.util.spec_from_file_location("tuned_schedules_build", REPO_ROOT / "tuned_schedules" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _load_build_script()


def calibration_endpoint_mse(scheduler, n: int, entry: Path):
    """Metric of the bundled entries (what `calibrate()` records as held-out `endpoint_mse_*`), recomputed with
    `BUILD.heldout_errors` from the recorded seed, held-out count, teacher steps, batch size and conditioning.

    Returns (recomputed, expected), each {"untuned": ..., "tuned": ...}. `heldout_check.json` (written by build.py)
    holds the full recompute, checked here against the calibration's own record in tuning_info, and a subset: the
    first k held-out x_T (k = BUILD.CHECK_SUBSET per model: the whole set for the exact GMM, 16 for the MNIST UNet,
    whose full 50-step-teacher recompute takes minutes on 1 thread). The test recomputes the subset; when it is the
    whole set it is compared with the calibration's record directly."""
    info = scheduler.config.tuning_info[str(n)]
    recorded = {k: info["heldout"][f"endpoint_mse_{k}"] for k in ("untuned", "tuned")}
    check = json.loads((entry / BUILD.CHECK_NAME).read_text())[str(n)]
    full, subset = check["full_recompute"], check["subset"]
    assert full["num_samples"] == int(info["num_heldout_samples"])
    for k in ("untuned", "tuned"):
        assert full[f"endpoint_mse_{k}"] == pytest.approx(recorded[k], rel=METRIC_RTOL)
    got = BUILD.heldout_errors(scheduler, n, subset["num_samples"])
    expected = recorded if subset["num_samples"] == full["num_samples"] else {
        k: subset[f"endpoint_mse_{k}"] for k in ("untuned", "tuned")}
    return {k: got[f"endpoint_mse_{k}"] for k in ("untuned", "tuned")}, expected


# metric name recorded in tuning_info[n]["heldout"] ("<metric>_tuned") -> function(scheduler, n, entry folder)
# returning (recomputed, expected) dicts {"untuned": ..., "tuned": ...}.
METRIC_EVALUATORS = {
    "tiny_endpoint_mse": lambda scheduler, n, entry: (
        {"tuned": tiny_endpoint_mse(scheduler, n)},
        {"tuned": hub.recorded_held_out(scheduler.config.tuning_info[str(n)]).tuned}),
    "endpoint_mse": calibration_endpoint_mse,
}
# Deterministic CPU recomputation: same seeds, same batch composition, so the only difference is float32 summation
# order (thread count / BLAS kernel choice). Measured: build.py's per-sample recompute equals the calibration's
# record to 2e-16 relative (GMM, MNIST; 1 thread; passes with 2 too); 1e-4 leaves room for other kernels. It still
# catches a 0.5-timestep change of one tau (measured: GMM figure moves 2.7e-4, MNIST 16-sample figure 2.2e-3).
METRIC_RTOL = 1e-4


@pytest.fixture(scope="module")
def fixture_entry(tmp_path_factory):
    """A bundled-style entry built here: a table for 4 steps whose recorded metric is measured on the spot."""
    scheduler = tuned_scheduler()
    untuned = type(scheduler).from_config(
        {**scheduler.config, "tuned_timesteps": None, "tuned_grids": None, "tuning_info": None})
    info = dict(scheduler.config.tuning_info["4"])
    info["heldout"] = {"tiny_endpoint_mse_untuned": tiny_endpoint_mse(untuned, 4),
                       "tiny_endpoint_mse_tuned": tiny_endpoint_mse(scheduler, 4)}
    scheduler = scheduler.with_tuned_timesteps(4, scheduler.config.tuned_timesteps["4"],
                                               grid=scheduler.config.tuned_grids["4"], info=info)
    root = tmp_path_factory.mktemp("bundled")
    make_calibration_output(str(root / "tiny-ddim-4-g1"), scheduler)
    return root / "tiny-ddim-4-g1"


def _entry_path(name, fixture_entry) -> Path:
    return fixture_entry if name == FIXTURE else hub.bundled_schedules_dir() / name


@pytest.mark.parametrize("name", [FIXTURE] + BUNDLED)
def test_entry_loads_and_matches_its_grid(name, fixture_entry):
    path = _entry_path(name, fixture_entry)
    scheduler = hub.load_tuned_scheduler(str(path) if name == FIXTURE else name)
    config = scheduler.config
    assert config.tuned_timesteps, f"{name}: no table"
    for n, taus in config.tuned_timesteps.items():
        scheduler.set_timesteps(int(n))
        assert [float(t) for t in scheduler.grid_timesteps] == [float(t) for t in config.tuned_grids[n]]
        assert torch.allclose(scheduler.timesteps.double(), torch.tensor(taus, dtype=torch.float64), atol=1e-4)
    if name != FIXTURE:  # shipped entries carry their provenance
        assert (path / hub.PROVENANCE_NAME).is_file() or (path / hub.REPORT_NAME).is_file()


@pytest.mark.parametrize("name", [FIXTURE] + BUNDLED)
def test_entry_metric_reproduces(name, fixture_entry):
    path = _entry_path(name, fixture_entry)
    scheduler = hub.load_tuned_scheduler(str(path) if name == FIXTURE else name)
    for n, info in scheduler.config.tuning_info.items():
        held = hub.recorded_held_out(info)
        assert held, f"{name}: no held-out measurement recorded for {n} steps"
        metric, untuned, tuned = held.metric, held.untuned, held.tuned
        evaluator = METRIC_EVALUATORS.get(metric)
        if evaluator is None:
            pytest.fail(f"{name}: no evaluator wired for metric {metric!r} (add it to METRIC_EVALUATORS)")
        assert tuned < untuned, f"{name}, {n} steps: a shipped table must beat no table ({metric})"
        # the check can only tell a lost / altered table apart if tuned and untuned differ beyond the tolerance
        assert abs(tuned - untuned) > 10 * METRIC_RTOL * abs(tuned), f"{name}, {n} steps"
        got, expected = evaluator(scheduler, int(n), path)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=METRIC_RTOL), f"{name}, {n} steps, {key}"


@pytest.mark.parametrize("name", BUNDLED)
def test_learned_grid_entries_differ_from_the_default_grid(name):
    """An entry that ships a learned grid must differ from the scheduler's own grid for that step count (else the
    reproduce check above would only show that the default sampler reproduces)."""
    scheduler = hub.load_tuned_scheduler(name)
    for n, info in scheduler.config.tuning_info.items():
        if not info.get("learned_grid"):
            continue
        default = type(scheduler).from_config(
            {**scheduler.config, "tuned_timesteps": None, "tuned_grids": None, "tuning_info": None})
        default.set_timesteps(int(n))
        assert [int(t) for t in scheduler.config.tuned_grids[n]] != [int(t) for t in default.grid_timesteps], name


def test_fixture_entry_is_indexed(fixture_entry):
    text = hub.render_bundled_index(fixture_entry.parent)
    assert "| `tiny-ddim-4-g1` | test-org/tiny-unet | TimeTunerDDIMScheduler | 4 | 1.0 | paper |" in text


# -- packaging -----------------------------------------------------------------------------------------------------
def _copy_source_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE"):
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, dst / name)
    shutil.copytree(REPO_ROOT / "src", dst / "src", ignore=ignore)  # the bundled entries are inside the package


def test_wheel_ships_tuned_schedules_and_finds_them(tmp_path, fixture_entry):
    """Build a wheel (setuptools' PEP 517 backend, no isolation: offline) from a copy of the tree plus the fixture
    entry, check its file list, unpack it as pip would into site-packages, and load the entry from there."""
    src = tmp_path / "src_tree"
    src.mkdir()
    _copy_source_tree(src)
    shutil.copytree(fixture_entry, src / "src" / "diffusers_timetuner" / "tuned_schedules" / fixture_entry.name)
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_wheel({str(out)!r}))"],
        cwd=src, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = out / build.stdout.strip().splitlines()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    prefix = f"diffusers_timetuner/tuned_schedules/{fixture_entry.name}/"
    for required in ("scheduler_config.json", "report.json", "calibration.png"):
        assert prefix + required in names, names
    assert "diffusers_timetuner/tuned_schedules/README.md" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import json; from diffusers_timetuner import hub;"
        f"s = hub.load_tuned_scheduler({fixture_entry.name!r});"
        "print(json.dumps([str(hub.bundled_schedules_dir()), dict(s.config.tuned_timesteps)]))"
    )
    # only the unpacked wheel provides diffusers_timetuner (src/ is not on this path)
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    where, tables = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(where) == site / "diffusers_timetuner" / "tuned_schedules"
    assert tables == json.loads((fixture_entry / "scheduler_config.json").read_text())["tuned_timesteps"]
