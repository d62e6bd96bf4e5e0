"""Bundled MNIST UNet, the class-conditional pipeline, the data split and the training script (all offline)."""
import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_timetuner.testbeds.mnist import classifier
from diffusers_timetuner.testbeds import MNIST_MODEL_DIR, load_mnist_pipeline
from diffusers_timetuner.testbeds.data import load_mnist, load_sklearn_digits, mnist_split_indices


@pytest.fixture(scope="module")
def pipe():
    # Loaded from the package folder (an absolute local path): no Hub call is made.
    return load_mnist_pipeline()


def test_bundled_model_layout(pipe):
    assert os.path.isfile(os.path.join(MNIST_MODEL_DIR, "unet", "diffusion_pytorch_model.safetensors"))
    assert pipe.unet.config.num_class_embeds == 11 and pipe.null_class_label == 10
    assert pipe.unet.config.sample_size == 28 and pipe.unet.dtype == torch.float32
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.clip_sample is False  # clipping breaks guidance (docs/facts.md, 5)
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.num_train_timesteps == 1000


def test_fast_quality_check(pipe):
    labels = torch.arange(10).repeat_interleave(5)
    images = pipe(class_labels=labels, num_inference_steps=25, generator=torch.Generator().manual_seed(0),
                  output_type="latent").images
    assert images.shape == (50, 1, 28, 28)
    # Full evaluation (PROVENANCE.md): 96.5% at 20 and 96.1% at 100 DDIM steps over 1000 samples; with 50
    # samples a binomial(50, 0.96) falls below 40 (80%) with probability < 1e-6.
    assert classifier.classifier_accuracy(images, labels) >= 0.80


def test_guidance_and_reproducibility(pipe):
    kwargs = dict(class_labels=[3, 7], num_inference_steps=4, output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    b = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    g = pipe(generator=torch.Generator().manual_seed(1), guidance_scale=2.0, **kwargs).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - g).abs().max() > 1e-3
    out = pipe(class_labels=1, batch_size=2, num_inference_steps=2, output_type="np").images
    assert out.shape == (2, 28, 28, 1) and out.min() >= 0 and out.max() <= 1
    pil = pipe(num_inference_steps=2, output_type="pil").images  # unconditional = null class
    assert len(pil) == 1 and pil[0].size == (28, 28)


def test_pipeline_bad_inputs(pipe):
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        pipe(class_labels=[11], num_inference_steps=1)
    with pytest.raises(ValueError, match="one per sample"):
        pipe(class_labels=[1, 2, 3], batch_size=2, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], num_inference_steps=1, output_type="jpg")
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(class_labels=[1], num_inference_steps=1, latents=torch.zeros(1, 1, 8, 8))


def test_mnist_split():
    train, held = mnist_split_indices("train"), mnist_split_indices("heldout")
    assert len(train) == 4000 and len(held) == 1000 and not set(train) & set(held)
    images, labels = load_mnist("heldout")
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert (labels.bincount() == 100).all()
    np.testing.assert_array_equal(mnist_split_indices("heldout"), held)  # seeded: identical on every call
    with pytest.raises(ValueError, match="split"):
        load_mnist("test")
    digits, dl = load_sklearn_digits()
    assert digits.shape == (1797, 1, 8, 8) and digits.min() == -1 and digits.max() == 1 and len(dl) == 1797


def test_train_script_runs_on_cpu(tmp_path):
    from diffusers_timetuner.testbeds.mnist import train

    argv = ["--output_dir", str(tmp_path), "--max_steps", "2", "--batch_size", "4", "--grid_steps", "1",
            "--device", "cpu", "--log_every", "1"]
    stats = train.main(argv=argv)
    assert stats["steps"] == 2 and np.isfinite(stats["final_loss"])
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "grid.png", "PROVENANCE.md"):
        assert (tmp_path / f).is_file(), f
    assert "--max_steps 2" in (tmp_path / "PROVENANCE.md").read_text()
