"""`LatentTextDiffusionPipeline`: sample text from a latent diffusion language model (LD4LG).

Gaussian noise ``z_T [B, N, D]`` is denoised by a `LatentDenoiser` under any diffusers scheduler
(with self-conditioning and optional classifier-free guidance); the autoencoder's reconstruction
network maps the clean latents to a memory ``[B, N, d_model]`` that the language model's decoder
cross-attends to while it writes the text.

```python
from latentlm.pipelines import LatentTextDiffusionPipeline
from diffusers import DPMSolverMultistepScheduler

pipe = LatentTextDiffusionPipeline.from_pretrained("outputs/quickstart/pipeline")
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
texts = pipe(num_samples=4, class_labels="Italian", guidance_scale=2.0, num_inference_steps=25).texts
```
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from latentlm.autoencoder.modeling_latent_autoencoder import LatentAutoencoder
from latentlm.autoencoder.text_codec import decode_latents, encode_texts, merge_peft
from latentlm.diffusion.modeling_latent_classifier import LatentClassifier
from latentlm.diffusion.modeling_latent_denoiser import LatentDenoiser
from latentlm.diffusion.schedules import PREDICTION_TYPES, guide_model_output, predict_original_sample
from latentlm.pipelines.classifier_guidance import check_classifier, control_gradient, prepare_controls

# File written next to model_index.json so that diffusers' generic loader,
# `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, finds the pipeline class
# (a Hub-style custom pipeline). It only re-exports the installed class: the folder carries no
# code of its own, and `LatentTextDiffusionPipeline.from_pretrained` runs the file only when it is
# byte-for-byte this stub.
CUSTOM_PIPELINE_MODULE = "pipeline_latent_text_diffusion"
CUSTOM_PIPELINE_STUB = (
    '"""Hub-style entry point for diffusers\' generic loader; needs `pip install latentlm`."""\n'
    "from latentlm.pipelines.pipeline_latent_text_diffusion import LatentTextDiffusionPipeline\n"
    "\n"
    '__all__ = ["LatentTextDiffusionPipeline"]\n'
)

COMPONENTS = ("tokenizer", "language_model", "autoencoder", "denoiser", "scheduler")


#: diffusers schedulers that sample well from a trained latent denoiser with the cosine schedule
#: (`benchmarks/scheduler_support.py`); build them with ``Cls.from_config(pipe.scheduler.config)``.
CLASSIFIERS_DIR = "classifiers"

SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)
#: schedulers that accept this pipeline's config but do not work with it, and why
UNSUPPORTED_SCHEDULERS = {
    "HeunDiscreteScheduler": (
        "its second-order correction amplifies the denoiser's error at the huge sigma_max of the cosine "
        "schedule, so samples diverge at usual step counts"
    ),
    "KDPM2AncestralDiscreteScheduler": "it diverges at 10 steps and fails with an IndexError at 5",
}


@dataclass
class LatentTextDiffusionPipelineOutput(BaseOutput):
    """Output of `LatentTextDiffusionPipeline.__call__`.

    Args:
        texts: the decoded samples (``None`` when ``output_type="latent"``).
        latents: the clean latents ``[batch, num_latents, latent_dim]`` (float32).
    """

    texts: list[str] | None
    latents: torch.Tensor


class LatentTextDiffusionPipeline(DiffusionPipeline):
    r"""Text generation by latent diffusion (LD4LG).

    Components:
        tokenizer: the language model's tokenizer.
        language_model: a transformers encoder-decoder (BART, T5, ``EncoderDecoderModel``); a
            ``PeftModel`` is accepted and merged into a plain model (the pipeline saves no adapters).
        autoencoder (`LatentAutoencoder`): compression (encoder states -> latents) and
            reconstruction (latents -> decoder memory).
        denoiser (`LatentDenoiser`): predicts the scheduler's target from ``z_t``, ``t``, the
            previous ``ẑ0`` (self-conditioning) and a class label; class names live in its config.
        scheduler: any diffusers scheduler over ``alphas_cumprod`` (DDPM, DDIM, DPM-Solver++,
            UniPC, Euler ...) whose ``prediction_type`` is the one the denoiser was trained for.

    Classifiers (optional, for classifier guidance): named `LatentClassifier` s over this pipeline's
    latents (`add_classifier`), saved in ``classifiers/<name>/`` and loaded with the pipeline.

    Config (besides the components, saved in ``model_index.json``): ``prediction_type`` (the
    denoiser's training target; defaults to the scheduler's at construction), ``max_length``
    (tokens kept by `encode`) and ``decode_kwargs`` (this pipeline's default generation arguments,
    over `latentlm.autoencoder.text_codec.DEFAULT_GENERATE_KWARGS`).
    """

    model_cpu_offload_seq = "denoiser->autoencoder->language_model"
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(
        self,
        tokenizer,
        language_model,
        autoencoder: LatentAutoencoder,
        denoiser: LatentDenoiser,
        scheduler,
        prediction_type: str | None = None,
        max_length: int = 64,
        decode_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        language_model = merge_peft(language_model)
        self.register_modules(
            tokenizer=tokenizer,
            language_model=language_model,
            autoencoder=autoencoder,
            denoiser=denoiser,
            scheduler=scheduler,
        )
        if prediction_type is None:
            prediction_type = scheduler.config.get("prediction_type", "epsilon") if scheduler is not None else None
        self.register_to_config(
            prediction_type=prediction_type, max_length=int(max_length), decode_kwargs=dict(decode_kwargs or {})
        )
        self.classifiers: dict[str, LatentClassifier] = {}

    def add_classifier(self, name: str, classifier: LatentClassifier) -> None:
        """Carry ``classifier`` as the control ``name`` (``pipe(controls={name: target})``); it must have
        been trained on this pipeline's latents (shape and autoencoder fingerprint are checked)."""
        cfg = self.denoiser.config
        check_classifier(name, classifier, cfg.num_latents, cfg.latent_dim, self.autoencoder)
        classifier.eval().requires_grad_(False)
        self.classifiers[name] = classifier

    # ------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        """The denoiser's class names (label id = position); empty for an unconditional model."""
        names = self.denoiser.config.get("class_names") or []
        num_classes = self.denoiser.config.get("num_classes", 0) or 0
        return list(names) if names else [str(i) for i in range(num_classes)]

    @torch.no_grad()
    def __call__(
        self,
        num_samples: int = 1,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "text",
        decode_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        return_dict: bool = True,
        scheduler=None,
        controls: dict[str, Any] | None = None,
        control_scale: float | dict[str, float] = 1.0,
    ) -> LatentTextDiffusionPipelineOutput | tuple:
        r"""Sample texts.

        Args:
            num_samples: batch size ``B``.
            class_labels: ``None`` (unconditional), one label for all samples, or ``B`` labels;
                a label is a class name (see `class_names`) or an id.
            guidance_scale: classifier-free guidance ``w``: ``uncond + w * (cond - uncond)``;
                1.0 disables it (one forward pass per step), anything else needs class labels.
            num_inference_steps: scheduler steps.
            generator: makes sampling (initial noise, stochastic steps) reproducible.
            latents: initial noise ``[B, num_latents, latent_dim]`` (scaled by the scheduler's
                ``init_noise_sigma`` as in diffusers); drawn from ``generator`` when ``None``.
            output_type: ``"text"`` (decode) or ``"latent"`` (skip decoding; ``texts`` is ``None``).
            decode_kwargs: generation arguments for this call (beams, max_length ...), over the
                pipeline's ``config.decode_kwargs`` and `text_codec.DEFAULT_GENERATE_KWARGS`.
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` after each step;
                a returned ``"latents"`` (``z_t`` for the next step) or ``"pred_original_sample"``
                (ẑ0, fed back by self-conditioning; after the last step it is the output) replaces
                the current one.
            callback_on_step_end_tensor_inputs: names passed in ``tensors`` (``latents``,
                ``pred_original_sample``).
            return_dict: return a `LatentTextDiffusionPipelineOutput` instead of a tuple.
            scheduler: a scheduler for this call only (default: ``self.scheduler``). Each call
                steps its own copy, so calls from several threads never share scheduler state.
            controls: classifier guidance, ``{name: target}`` over the carried classifiers: a class
                name (or id) for a classification head, a number for a regression head (e.g.
                ``{"price": "cheap", "length": 12}``); one target for all samples or one per sample.
                At each step ∇ log p(y | z_t) is added to the score (`guide_model_output`); several
                controls multiply (a product of experts). Combines with classes and ``guidance_scale``.
            control_scale: the classifiers' weight, one number or ``{name: number}`` (>= 0).

        Returns:
            `LatentTextDiffusionPipelineOutput` (``texts``, ``latents [B, N, D]``: the denoiser's clean
            estimate ẑ0 at the last step) or ``(texts, latents)``.
        """
        # 0. Check inputs.
        self.check_inputs(
            num_samples, num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs
        )
        # A private copy: set_timesteps() and step() keep per-call state (step index, solver history).
        scheduler = copy.deepcopy(scheduler if scheduler is not None else self.scheduler)
        self.check_scheduler(scheduler)
        labels = self.prepare_class_labels(class_labels, num_samples)
        controls = prepare_controls(self.classifiers, controls, control_scale, num_samples)
        do_guidance = guidance_scale != 1.0
        if do_guidance and labels is None:
            if not self.class_names:
                raise ValueError(
                    f"guidance_scale={guidance_scale} needs a class-conditional denoiser, but this one is "
                    "unconditional (num_classes=0). Use guidance_scale=1.0."
                )
            raise ValueError(f"guidance_scale={guidance_scale} needs class_labels (one of {self.class_names}).")

        device = self._execution_device
        shape = (num_samples, self.denoiser.config.num_latents, self.denoiser.config.latent_dim)

        # 1. Initial noise.
        latents = self.prepare_latents(shape, generator, device, latents, scheduler)

        # 2. Timesteps.
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, scheduler)

        if labels is not None:
            labels = labels.to(device)
            if do_guidance:
                # Unconditional half first: one batched forward pass gives both predictions.
                null = torch.full_like(labels, self.denoiser.config.num_classes)
                labels = torch.cat([null, labels])
        use_self_cond = bool(self.denoiser.config.get("self_conditioning", False))
        pred_original_sample = None  # ẑ0 of the previous step, fed back (self-conditioning)

        # 3. Denoising loop.
        for i, t in enumerate(self.progress_bar(timesteps)):
            # Euler-type schedulers keep latents at sigma scale; the denoiser sees DDPM-scale z_t.
            model_input = scheduler.scale_model_input(latents, t)
            self_cond = pred_original_sample if use_self_cond else None
            model_output = self.guided_model_output(model_input, t, self_cond, labels, guidance_scale)
            if controls:
                gradient = control_gradient(controls, model_input, t)
                model_output = guide_model_output(
                    scheduler, model_output, model_input, t, gradient, prediction_type=self.config.prediction_type
                )

            # ẑ0 of the guided prediction (Euler: from the rescaled model input, which is z_t).
            pred_original_sample = predict_original_sample(
                scheduler, model_output, model_input, t, prediction_type=self.config.prediction_type
            )
            latents = scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=True).prev_sample

            if callback_on_step_end is not None:
                local = {"latents": latents, "pred_original_sample": pred_original_sample}
                callback_outputs = (
                    callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}) or {}
                )
                latents = callback_outputs.get("latents", latents)
                pred_original_sample = callback_outputs.get("pred_original_sample", pred_original_sample)

        # The sample is the last clean estimate ẑ0, as in LD4LG: a DDPM step with few inference
        # steps and variance "fixed_large" would otherwise add noise of std sqrt(1 - ᾱ_t) on its
        # final jump to t=0; deterministic schedulers end at (or next to) this estimate anyway.
        latents = pred_original_sample

        # 4. Decode.
        texts = None
        if output_type == "text":
            texts = self.decode(latents, **(decode_kwargs or {}))
        self.maybe_free_model_hooks()

        if not return_dict:
            return texts, latents
        return LatentTextDiffusionPipelineOutput(texts=texts, latents=latents)

    # ------------------------------------------------------------------------------------------
    # Helpers of __call__ (public so that subclasses and tests can use them)
    # ------------------------------------------------------------------------------------------

    def prepare_class_labels(self, class_labels, num_samples: int) -> torch.Tensor | None:
        """Class names / ids -> ``LongTensor [num_samples]`` (or ``None`` for unconditional)."""
        if class_labels is None:
            return None
        names = self.class_names
        if not names:
            raise ValueError(
                f"class_labels={class_labels!r} given, but the denoiser is unconditional (num_classes=0): "
                "sample without class_labels."
            )
        if torch.is_tensor(class_labels):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (str, int, np.integer)):
            class_labels = [class_labels] * num_samples
        if not isinstance(class_labels, (list, tuple)):
            raise ValueError(f"class_labels={class_labels!r}: give a class name (str), an id (int), or a list of them.")
        class_labels = list(class_labels)
        if len(class_labels) != num_samples:
            raise ValueError(
                f"got {len(class_labels)} class labels for num_samples={num_samples}: pass one label, "
                "or exactly num_samples labels."
            )
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"unknown class name {label!r}; this model knows {names}.")
                ids.append(names.index(label))
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool):
                if not 0 <= int(label) < len(names):
                    raise ValueError(f"class id {label} is out of range: use 0..{len(names) - 1} ({names}).")
                ids.append(int(label))
            else:
                raise ValueError(f"class label {label!r} must be a class name (str) or an id (int).")
        return torch.tensor(ids, dtype=torch.long)

    def check_inputs(
        self, num_samples, num_inference_steps, guidance_scale, output_type, callback_on_step_end_tensor_inputs
    ) -> None:
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (1 = no guidance, 0 = unconditional), got {guidance_scale!r}."
            )
        if output_type not in ("text", "latent"):
            raise ValueError(f"output_type={output_type!r}: use 'text' or 'latent'.")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs has {name!r}; allowed: {self._callback_tensor_inputs}."
                )

    def prepare_latents(self, shape, generator, device, latents, scheduler) -> torch.Tensor:
        """Initial noise ``z_T`` scaled by the scheduler; float32 for the scheduler arithmetic whatever
        the model dtype."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents have shape {tuple(latents.shape)}, expected {shape} "
                    "[num_samples, num_latents, latent_dim]."
                )
            latents = latents.to(device=device, dtype=torch.float32)
        return latents * scheduler.init_noise_sigma

    def guided_model_output(self, model_input, t, self_cond, labels, guidance_scale: float) -> torch.Tensor:
        """The denoiser's prediction at ``t``; with guidance (``labels`` holding the null class first,
        then the classes), ``uncond + w * (cond - uncond)`` from one batched forward pass."""
        do_guidance = guidance_scale != 1.0
        x, sc = model_input, self_cond
        if do_guidance:
            x = torch.cat([x, x])
            sc = None if sc is None else torch.cat([sc, sc])
        timestep = t.expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device)
        dtype = self.denoiser.dtype
        model_output = self.denoiser(
            x.to(dtype), timestep, self_cond=None if sc is None else sc.to(dtype), class_labels=labels, return_dict=True
        ).sample.float()
        if do_guidance:
            uncond, cond = model_output.chunk(2)
            model_output = uncond + guidance_scale * (cond - uncond)
        return model_output

    def check_scheduler(self, scheduler=None) -> None:
        """The scheduler must predict what the denoiser was trained for and work in alphas_cumprod."""
        scheduler = scheduler if scheduler is not None else self.scheduler
        if self.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"pipeline prediction_type={self.config.prediction_type!r}: use one of {PREDICTION_TYPES}."
            )
        scheduler_type = scheduler.config.get("prediction_type")
        if scheduler_type != self.config.prediction_type:
            raise ValueError(
                f"{type(scheduler).__name__} has prediction_type={scheduler_type!r} but the denoiser was "
                f"trained for {self.config.prediction_type!r}. Build the scheduler from the pipeline's config, "
                f"e.g. `pipe.scheduler = {type(scheduler).__name__}.from_config(pipe.scheduler.config)`, or "
                f"pass prediction_type={self.config.prediction_type!r}."
            )
        name = type(scheduler).__name__
        if name in UNSUPPORTED_SCHEDULERS:
            raise ValueError(
                f"{name} is not supported by this pipeline: {UNSUPPORTED_SCHEDULERS[name]}. Use one of "
                f"{list(SUPPORTED_SCHEDULERS)}, e.g. DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)."
            )
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod; use a DDPM-family scheduler "
                "(DDPM, DDIM, DPMSolverMultistep, UniPC, Euler ...)."
            )

    def prepare_extra_step_kwargs(self, generator, scheduler=None) -> dict:
        # Schedulers differ in what step() accepts (UniPC takes no generator).
        params = inspect.signature((scheduler if scheduler is not None else self.scheduler).step).parameters
        return {"generator": generator} if "generator" in params else {}

    # ------------------------------------------------------------------------------------------
    # Convenience: text <-> latents
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, texts: str | list[str], max_length: int | None = None) -> torch.Tensor:
        """Texts -> clean latents ``[B, num_latents, latent_dim]`` (float32)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("encode() needs at least one text.")
        latents = encode_texts(
            self.tokenizer, self.language_model, self.autoencoder, texts, max_length or self.config.max_length
        )
        return latents.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, **generate_kwargs) -> list[str]:
        """Latents ``[B, num_latents, latent_dim]`` -> texts.

        ``generate_kwargs`` override the pipeline's ``config.decode_kwargs``, which override
        `text_codec.DEFAULT_GENERATE_KWARGS` (LD4LG's beam search).
        """
        generate_kwargs = {**(self.config.get("decode_kwargs") or {}), **generate_kwargs}
        expected = (self.denoiser.config.num_latents, self.denoiser.config.latent_dim)
        if not torch.is_tensor(latents):
            raise TypeError(
                f"decode() takes a latent tensor [batch, {expected[0]}, {expected[1]}], got "
                f"{type(latents).__name__}; use encode(texts) or the pipeline's output .latents."
            )
        if latents.ndim != 3 or tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"latents have shape {tuple(latents.shape)}, expected [batch, {expected[0]}, {expected[1]}]."
            )
        latents = latents.to(device=self.autoencoder.device, dtype=self.autoencoder.dtype)
        return decode_latents(self.tokenizer, self.language_model, self.autoencoder, latents, **generate_kwargs)

    @torch.no_grad()
    def interpolate(
        self, text_a: str, text_b: str, num_steps: int = 5, method: str = "slerp", **generate_kwargs
    ) -> list[str]:
        """Decode ``num_steps`` points on the path from ``text_a``'s latents to ``text_b``'s (ends included).

        ``slerp`` interpolates each latent vector on the sphere (norms are kept, which matters for
        normalised latents); ``lerp`` interpolates linearly.
        """
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2 (both ends are included), got {num_steps}.")
        if method not in ("slerp", "lerp"):
            raise ValueError(f"method={method!r}: use 'slerp' or 'lerp'.")
        z_a, z_b = self.encode([text_a, text_b]).chunk(2)  # [1, N, D] each
        weights = torch.linspace(0.0, 1.0, num_steps, device=z_a.device).view(-1, 1, 1)
        if method == "lerp":
            path = (1 - weights) * z_a + weights * z_b
        else:
            path = slerp(z_a, z_b, weights)
        return self.decode(path, **generate_kwargs)

    # ------------------------------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True, **kwargs):
        """Save ``model_index.json`` + one folder per component (safetensors), loadable by this class
        and by ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``."""
        if not safe_serialization:
            raise ValueError("latentlm saves safetensors only; drop safe_serialization=False.")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        save_directory = Path(save_directory)
        # A ["module", "Class"] pair in _class_name plus the module file is how diffusers finds a
        # Hub-style custom pipeline (pipeline_loading_utils._resolve_custom_pipeline_and_cls).
        index_path = save_directory / self.config_name
        index = json.loads(index_path.read_text())
        index["_class_name"] = [CUSTOM_PIPELINE_MODULE, type(self).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (save_directory / f"{CUSTOM_PIPELINE_MODULE}.py").write_text(CUSTOM_PIPELINE_STUB)
        for name, classifier in self.classifiers.items():
            classifier.save_pretrained(save_directory / CLASSIFIERS_DIR / name, safe_serialization=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder written by `save_pretrained` (offline; extra kwargs go to diffusers,
        e.g. ``torch_dtype``)."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a pipeline folder. latentlm loads local folders written by "
                "save_pretrained (for a hub repo, download it first, e.g. huggingface_hub.snapshot_download)."
            )
        index_path = folder / cls.config_name
        if not index_path.is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no {cls.config_name}: it is not a saved pipeline folder.")
        index = json.loads(index_path.read_text())
        missing = [name for name in COMPONENTS if name not in index or not (folder / name).is_dir()]
        if missing:
            raise ValueError(
                f"pipeline folder {str(folder)!r} is missing the component(s) {missing} "
                f"(expected sub-folders {list(COMPONENTS)} listed in {cls.config_name}); save it again "
                "with save_pretrained."
            )
        stub = folder / f"{CUSTOM_PIPELINE_MODULE}.py"
        if isinstance(index.get("_class_name"), list):
            # diffusers would import the folder's module file; allow it only when it is our stub.
            if not stub.is_file() or stub.read_text() != CUSTOM_PIPELINE_STUB:
                raise ValueError(
                    f"{str(stub)!r} differs from the file latentlm writes; refusing to run code from the folder. "
                    "Load it with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) if you trust it."
                )
            kwargs.setdefault("trust_remote_code", True)
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(str(folder), **kwargs)
        classifiers = folder / CLASSIFIERS_DIR
        for path in sorted(classifiers.iterdir()) if classifiers.is_dir() else []:
            if (path / "config.json").is_file():
                pipe.add_classifier(path.name, LatentClassifier.from_pretrained(path).to(pipe.device))
        return pipe


def slerp(z_a: torch.Tensor, z_b: torch.Tensor, weights: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation along the last dim: ``z_a, z_b [1, N, D]``, ``weights [S, 1, 1]`` -> ``[S, N, D]``.

    Norms are interpolated linearly; nearly parallel vectors fall back to lerp.
    """
    norm_a, norm_b = z_a.norm(dim=-1, keepdim=True), z_b.norm(dim=-1, keepdim=True)
    u_a, u_b = z_a / norm_a.clamp_min(eps), z_b / norm_b.clamp_min(eps)
    cos = (u_a * u_b).sum(-1, keepdim=True).clamp(-1 + eps, 1 - eps)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-4
    w_a = torch.where(parallel, 1 - weights, torch.sin((1 - weights) * omega) / sin)
    w_b = torch.where(parallel, weights, torch.sin(weights * omega) / sin)
    direction = w_a * u_a + w_b * u_b
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    return direction * ((1 - weights) * norm_a + weights * norm_b)
