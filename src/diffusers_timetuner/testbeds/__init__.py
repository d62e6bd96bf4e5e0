"""Testbeds: real diffusion models that run offline, for calibration, tests, benchmarks and the demo.

- `load_mnist_pipeline()`: the bundled class-conditional MNIST `UNet2DModel` (28x28, label 10 = null class) with
  a DDIMScheduler (clip_sample=False); the package's default model. Weights and provenance in ``testbeds/mnist/``.
- `load_mnist_flow_pipeline()`: the bundled class-conditional flow-matching MNIST `UNet2DModel` (16x16, rectified
  flow, velocity eps - x_0 at network time 1000 s) with a FlowMatchEulerDiscreteScheduler (shift 1.0).
  Weights and provenance in ``testbeds/mnist_flow/``.
- `load_fashion_pipeline()`: the bundled class-conditional Fashion-MNIST `UNet2DModel` (16x16, epsilon, linear
  betas) with a DDIMScheduler (clip_sample=False); more few-step headroom than the MNIST model. ``testbeds/fashion/``.
- `load_gmm_pipeline()`: the exact-score `GaussianMixtureDenoiser` fitted to scikit-learn's 8x8 digits
  (10 components, seed 0, bundled in ``testbeds/gmm_digits/``), with a DDIMScheduler on the same betas.
- `load_flow_gmm_model()`: the same mixture under the rectified flow x_s = (1 - s) x_0 + s eps, as an exact-velocity
  flow-matching model (`FlowMatchingGaussianMixture`, called like a FlowMatchEuler pipeline's transformer).
- `load_gmm_cm_pipeline()`: a consistency model of the same mixture (`ConsistencyMLP`, distilled from the mixture's
  exact probability-flow ODE) in a `ConsistencyModelPipeline` with its `CMStochasticIterativeScheduler`. Weights,
  training script and provenance in ``testbeds/gmm_cm/``.

All but the consistency model return a `ClassConditionalImagePipeline` (unet + scheduler), what
`DiffusionPipeline.from_pretrained` gives.
"""
import os
from typing import Optional, Union

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from .flow_gmm import FlowMatchingGaussianMixture
from .gmm import GaussianMixtureDenoiser, alpha_bar_at
from .pipeline import ClassConditionalImagePipeline

_HERE = os.path.dirname(os.path.abspath(__file__))
MNIST_MODEL_DIR = os.path.join(_HERE, "mnist")
GMM_MODEL_DIR = os.path.join(_HERE, "gmm_digits")
MNIST_FLOW_MODEL_DIR = os.path.join(_HERE, "mnist_flow")
FASHION_MODEL_DIR = os.path.join(_HERE, "fashion")
GMM_CM_MODEL_DIR = os.path.join(_HERE, "gmm_cm")
# Ids of the bundled models (the hub module skips them as base_model: they are not Hub repos).
MNIST_MODEL_ID = "diffusers-timetuner/bundled-mnist"
GMM_MODEL_ID = "diffusers-timetuner/bundled-gmm-digits"
MNIST_FLOW_MODEL_ID = "diffusers-timetuner/bundled-mnist-flow"
FASHION_MODEL_ID = "diffusers-timetuner/bundled-fashion-mnist"
FLOW_GMM_MODEL_ID = "diffusers-timetuner/bundled-flow-gmm-digits"
GMM_CM_MODEL_ID = "diffusers-timetuner/bundled-gmm-digits-cm"

__all__ = [
    "ClassConditionalImagePipeline",
    "FlowMatchingGaussianMixture",
    "GaussianMixtureDenoiser",
    "alpha_bar_at",
    "load_fashion_pipeline",
    "load_fashion_unet",
    "load_flow_gmm_model",
    "load_flow_gmm_pipeline",
    "load_gmm_cm_model",
    "load_gmm_cm_pipeline",
    "load_gmm_model",
    "load_gmm_pipeline",
    "load_mnist_pipeline",
    "load_mnist_flow_pipeline",
    "load_mnist_flow_unet",
    "load_mnist_unet",
    "MNIST_MODEL_DIR",
    "GMM_MODEL_DIR",
    "MNIST_FLOW_MODEL_DIR",
    "FASHION_MODEL_DIR",
    "MNIST_MODEL_ID",
    "GMM_MODEL_ID",
    "MNIST_FLOW_MODEL_ID",
    "FASHION_MODEL_ID",
    "FLOW_GMM_MODEL_ID",
    "GMM_CM_MODEL_DIR",
    "GMM_CM_MODEL_ID",
]


def load_mnist_unet(device: Union[str, torch.device] = "cpu") -> UNet2DModel:
    """The bundled MNIST `UNet2DModel` (float32, eval mode), loaded offline from ``testbeds/mnist/unet``."""
    return UNet2DModel.from_pretrained(MNIST_MODEL_DIR, subfolder="unet").to(device).eval()


def load_mnist_pipeline(device: Union[str, torch.device] = "cpu", scheduler=None) -> ClassConditionalImagePipeline:
    """The default model: bundled MNIST UNet + its DDIMScheduler (linear betas, clip_sample=False).

    Args:
        device: where the UNet lives.
        scheduler: optional scheduler to use instead of the bundled DDIMScheduler (e.g. a TimeTuner scheduler
            built with `SomeScheduler.from_config(pipe.scheduler.config)`).
    """
    if scheduler is None:
        scheduler = DDIMScheduler.from_pretrained(MNIST_MODEL_DIR, subfolder="scheduler")
    pipe = ClassConditionalImagePipeline(unet=load_mnist_unet(device), scheduler=scheduler)
    # A stable model id (not a Hub repo): recorded in tuned tables and checked when a table is put into a pipeline.
    pipe.register_to_config(_name_or_path=MNIST_MODEL_ID)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bundled_pipeline(model_dir, model_id, scheduler, device) -> ClassConditionalImagePipeline:
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet").to(device).eval()
    pipe = ClassConditionalImagePipeline(unet=unet, scheduler=scheduler)
    pipe.register_to_config(_name_or_path=model_id)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_mnist_flow_unet(device: Union[str, torch.device] = "cpu") -> UNet2DModel:
    """The bundled flow-matching MNIST `UNet2DModel` (float32, eval mode); it predicts the velocity eps - x_0."""
    return UNet2DModel.from_pretrained(MNIST_FLOW_MODEL_DIR, subfolder="unet").to(device).eval()


def load_mnist_flow_pipeline(device: Union[str, torch.device] = "cpu", scheduler=None) -> ClassConditionalImagePipeline:
    """Bundled flow-matching MNIST UNet (16x16) + its FlowMatchEulerDiscreteScheduler (shift 1.0, 1000 steps).

    Args:
        device: where the UNet lives.
        scheduler: optional scheduler to use instead (e.g. ``TimeTunerFlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config)``); it must feed the network ``t = 1000 s`` and step x <- x + (s' - s) v.
    """
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(MNIST_FLOW_MODEL_DIR, subfolder="scheduler")
    return _bundled_pipeline(MNIST_FLOW_MODEL_DIR, MNIST_FLOW_MODEL_ID, scheduler, device)


def load_fashion_unet(device: Union[str, torch.device] = "cpu") -> UNet2DModel:
    """The bundled Fashion-MNIST `UNet2DModel` (float32, eval mode, epsilon prediction)."""
    return UNet2DModel.from_pretrained(FASHION_MODEL_DIR, subfolder="unet").to(device).eval()


def load_fashion_pipeline(device: Union[str, torch.device] = "cpu", scheduler=None) -> ClassConditionalImagePipeline:
    """Bundled Fashion-MNIST UNet (16x16) + its DDIMScheduler (linear betas 1e-4..2e-2, clip_sample=False).

    Args:
        device: where the UNet lives.
        scheduler: optional scheduler to use instead of the bundled DDIMScheduler.
    """
    if scheduler is None:
        scheduler = DDIMScheduler.from_pretrained(FASHION_MODEL_DIR, subfolder="scheduler")
    return _bundled_pipeline(FASHION_MODEL_DIR, FASHION_MODEL_ID, scheduler, device)


def load_gmm_model(prediction_type: Optional[str] = None) -> GaussianMixtureDenoiser:
    """The bundled exact-score mixture (10 components fitted to sklearn digits, seed 0, reg_covar 1e-3).

    Args:
        prediction_type: override the saved "epsilon" ("v_prediction" or "sample").
    """
    kwargs = {} if prediction_type is None else {"prediction_type": prediction_type}
    return GaussianMixtureDenoiser.from_pretrained(GMM_MODEL_DIR, **kwargs).eval()


def load_flow_gmm_model() -> FlowMatchingGaussianMixture:
    """The bundled mixture (see `load_gmm_model`) as an exact rectified-flow velocity model (timestep = s * 1000)."""
    return FlowMatchingGaussianMixture.from_mixture(load_gmm_model()).eval()


def load_flow_gmm_pipeline(scheduler=None) -> ClassConditionalImagePipeline:
    """The exact flow-matching mixture + a `FlowMatchEulerDiscreteScheduler` (shift 1, 1000 training steps)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = ClassConditionalImagePipeline(unet=load_flow_gmm_model(),
                                         scheduler=scheduler or FlowMatchEulerDiscreteScheduler())
    pipe.register_to_config(_name_or_path=FLOW_GMM_MODEL_ID)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_gmm_pipeline(prediction_type: Optional[str] = None, scheduler=None) -> ClassConditionalImagePipeline:
    """Exact-score mixture + a DDIMScheduler on its betas (clip_sample=False: the data slightly exceed [-1, 1])."""
    model = load_gmm_model(prediction_type)
    if scheduler is None:
        c = model.config
        scheduler = DDIMScheduler(
            num_train_timesteps=c.num_train_timesteps,
            beta_start=c.beta_start,
            beta_end=c.beta_end,
            beta_schedule=c.beta_schedule,
            trained_betas=c.trained_betas,
            prediction_type=c.prediction_type,
            clip_sample=False,
            set_alpha_to_one=True,
        )
    pipe = ClassConditionalImagePipeline(unet=model, scheduler=scheduler)
    pipe.register_to_config(_name_or_path=GMM_MODEL_ID)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_gmm_cm_model(device: Union[str, torch.device] = "cpu"):
    """The bundled consistency model of the digits mixture (`ConsistencyMLP`, float32, eval mode)."""
    from .gmm_cm.model import ConsistencyMLP

    return ConsistencyMLP.from_pretrained(GMM_CM_MODEL_DIR, subfolder="unet").to(device).eval()


def load_gmm_cm_pipeline(device: Union[str, torch.device] = "cpu", scheduler=None):
    """Bundled consistency model of the mixture + its `CMStochasticIterativeScheduler` (Karras sigmas 0.002..80,
    40 discretisation steps, ``clip_denoised=False``), in diffusers' `ConsistencyModelPipeline`.

    Args:
        device: where the network lives.
        scheduler: optional scheduler to use instead (e.g. ``TimeTunerCMStochasticIterativeScheduler.from_config(
            pipe.scheduler.config)``).
    """
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    if scheduler is None:
        scheduler = CMStochasticIterativeScheduler.from_pretrained(GMM_CM_MODEL_DIR, subfolder="scheduler")
    pipe = ConsistencyModelPipeline(unet=load_gmm_cm_model(device), scheduler=scheduler)
    pipe.register_to_config(_name_or_path=GMM_CM_MODEL_ID)
    pipe.set_progress_bar_config(disable=True)
    return pipe
