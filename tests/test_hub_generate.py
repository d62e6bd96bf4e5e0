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
    argv = ["--pipeline", str(pipe_dir), "--schedule", schedule, "--num_images", "3", "--output", str(out)]

    # loaded from a folder, the pipeline's name is that path, not the recorded model id: refused unless told
    with pytest.raises(ValueError, match="model: tuned for test-org/tiny-unet"):
        gen.main(gen.parse_args(argv))
    gen.main(gen.parse_args(argv + ["--no_check_model_id"]))

    img = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    # 8x8 images upscaled x8 -> 64 px; 3 images -> one row of 3 per panel, 8 px gap, 14 px header (side_by_side)
    assert img.shape == (14 + 64, 2 * 3 * 64 + 8)
    left, right = img[14:, : 3 * 64], img[14:, 3 * 64 + 8:]
    assert np.abs(left - right).mean() > 0.5  # the table changes the samples (same seeds in both columns)

    again = tmp_path / "again.png"
    gen.main(gen.parse_args(argv[:-1] + [str(again), "--no_check_model_id"]))
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))  # seeded: reproducible


def test_generate_rejects_a_step_count_without_table(tmp_path):
    gen = _load_example()
    pipe_dir = tmp_path / "pipe"
    tiny_pipeline().save_pretrained(pipe_dir)
    schedule = make_calibration_output(str(tmp_path / "schedule"))
    args = gen.parse_args(["--pipeline", str(pipe_dir), "--schedule", schedule, "--num_images", "1",
                           "--num_inference_steps", "6", "--no_check_model_id", "--output", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match="not for 6"):
        gen.main(args)
    assert not (tmp_path / "x.png").exists()  # nothing half-written
