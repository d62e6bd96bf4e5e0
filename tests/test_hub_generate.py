"""examples/generate.py end to end on a tiny saved pipeline and a calibration output folder (offline)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hub_server.outputs import make_calibration_output, tiny_pipeline
from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generate.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("generate_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_writes_untuned_and_tuned_columns(tmp_path):
    gen = _load_example()
    pipe_dir = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(pipe_dir)
    schedule = make_calibration_output(str(tmp_path / "schedule"))
    out = tmp_path / "cmp.png"
    argv = ["--pipeline", str(pipe_dir), "--schedule", schedule, "--num_images", "3", "--num_threads", "1"]

    # loaded from a folder, the pipeline's name is that path, not the recorded model id: refused unless told
    with pytest.raises(ValueError, match="model: tuned for test-org/tiny-unet"):
        gen.main(gen.parse_args(argv + ["--output", str(out)]))
    gen.main(gen.parse_args(argv + ["--output", str(out), "--no_check_model_id"]))

    img = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    # 8x8 images upscaled x8 -> 64 px; 3 images -> one row of 3 per panel, 8 px gap, 14 px header (side_by_side)
    assert img.shape == (14 + 64, 2 * 3 * 64 + 8)
    left, right = img[14:, : 3 * 64], img[14:, 3 * 64 + 8:]
    assert np.abs(left - right).mean() > 0.5  # the table changes the samples (same seeds in both columns)

    again = tmp_path / "again.png"
    gen.main(gen.parse_args(argv + ["--output", str(again), "--no_check_model_id"]))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))  # seeded: reproducible


def test_generate_rejects_a_step_count_without_table(tmp_path):
    gen = _load_example()
    pipe_dir = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(pipe_dir)
    schedule = make_calibration_output(str(tmp_path / "schedule"))
    args = gen.parse_args(["--pipeline", str(pipe_dir), "--schedule", schedule, "--num_images", "1",
                           "--num_inference_steps", "6", "--no_check_model_id", "--num_threads", "1",
                           "--output", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="not for 6"):
        gen.main(args)
    assert not (tmp_path / "x.png").exists()  # nothing half-written


def test_generate_default_is_the_bundled_mnist_model(tmp_path):
    """The example's default pipeline (bundled MNIST UNet) with a table on its own noise schedule."""
    from diffusers_timetuner.schedulers import TimeTunerDDIMScheduler
    from diffusers_timetuner.testbeds import load_mnist_pipeline

    base = TimeTunerDDIMScheduler.from_config(load_mnist_pipeline().scheduler.config)
    base.set_timesteps(3)
    grid = [float(t) for t in base.grid_timesteps]
    tuned = base.with_tuned_timesteps(3, [t * 1.1 for t in grid], grid=grid,
                                      info={"model_id": "diffusers-timetuner/bundled-mnist", "guidance_scale": 1.0})
    schedule = make_calibration_output(str(tmp_path / "schedule"), tuned, report=False, plot=False)
    gen = _load_example()
    out = tmp_path / "mnist.png"
    gen.main(gen.parse_args(["--schedule", schedule, "--num_images", "2", "--output", str(out),
                                "--num_threads", "1"]))
    img = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    # 28x28 upscaled x2 -> 56 px; 2 images in one row per panel, 8 px gap, 14 px header
    assert img.shape == (14 + 56, 2 * 2 * 56 + 8)
    assert np.abs(img[14:, : 2 * 56] - img[14:, 2 * 56 + 8:]).mean() > 0.5
