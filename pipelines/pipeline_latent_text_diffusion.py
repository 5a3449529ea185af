"""`LatentTextDiffusionPipeline`: sample text from a latent diffusion language model (LD4LG).

Gaussian noise ``z_T [B, N, D]`` is denoised by a `LatentDenoiser` under any diffusers scheduler
(with self-conditioning and optional classifier-free guidance); the autoencoder's reconstruction
network maps the clean latents to a memory ``[B, N, d_model]`` that the language model's decoder
cross-attends to while it writes the text.

```python
from latentlm.pipelines import LatentTextDiffusionPipeline, SamplingOptions
from diffusers import DPMSolverMultistepScheduler

pipe = LatentTextDiffusionPipeline.from_pretrained("outputs/quickstart/pipeline")
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
texts = pipe(num_samples=4, class_labels="Italian", guidance_scale=2.0, num_inference_steps=25).texts
# the same settings as one object, which `latentlm.sample`, `latentlm.evaluate` and the MLflow model take
options = SamplingOptions(num_inference_steps=25, guidance_scale=2.0)
texts = pipe(num_samples=4, class_labels="Italian", options=options).texts
```

A text-to-text pipeline (its denoiser cross-attends to a source text's encoder states) generates
from sources: ``pipe(source_texts=[...], num_samples_per_source=2, mbr_candidates=5).texts`` is one
list of texts per source.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from latentlm.autoencoder.modeling_latent_autoencoder import LatentAutoencoder
from latentlm.autoencoder.text_codec import merge_peft
from latentlm.diffusion.modeling_latent_classifier import LatentClassifier
from latentlm.diffusion.modeling_latent_denoiser import LatentDenoiser
from latentlm.diffusion.schedules import guide_model_output, model_output_from_original_sample, predict_original_sample
from latentlm.pipelines.classifier_guidance import check_classifier, control_gradient, prepare_controls
from latentlm.pipelines.conditioning import (
    SourceStates,
    check_call_arguments,
    class_label_ids,
    count_outputs,
    refuse_out_of_memory,
)
from latentlm.pipelines.interpolation import slerp
from latentlm.pipelines.long_text import LongTextMixin
from latentlm.pipelines.mbr import mbr_select
from latentlm.pipelines.pipeline_folder import PipelineFolderMixin
from latentlm.pipelines.pipeline_output import LatentTextDiffusionPipelineOutput
from latentlm.pipelines.sampling_options import SamplingOptions, make_scheduler
from latentlm.pipelines.schedulers import (
    SUPPORTED_SCHEDULERS,
    UNSUPPORTED_SCHEDULERS,
    check_scheduler,
    extra_step_kwargs,
)
from latentlm.pipelines.text_latents import TextLatentsMixin

__all__ = [
    "LatentTextDiffusionPipeline",
    "LatentTextDiffusionPipelineOutput",
    "SUPPORTED_SCHEDULERS",
    "UNSUPPORTED_SCHEDULERS",
    "slerp",
]


class LatentTextDiffusionPipeline(PipelineFolderMixin, DiffusionPipeline, TextLatentsMixin, LongTextMixin):
    r"""Text generation by latent diffusion (LD4LG).

    Components:
        tokenizer: the language model's tokenizer.
        language_model: a transformers encoder-decoder (BART, T5, ``EncoderDecoderModel``) or causal
            LM; a ``PeftModel`` is merged into a plain model (the pipeline saves no adapters).
        autoencoder (`LatentAutoencoder`): encoder states -> latents -> decoder memory.
        denoiser (`LatentDenoiser`): predicts the scheduler's target from ``z_t``, ``t``, the previous
            ``ẑ0`` (self-conditioning), a class label and (text-to-text, ``cross_attention_dim``) a
            source text's encoder states; class names live in its config.
        scheduler: any diffusers scheduler over ``alphas_cumprod`` (DDPM, DDIM, DPM-Solver++, UniPC,
            Euler ...) predicting the denoiser's ``prediction_type``.

    Classifier guidance: named `LatentClassifier` s over these latents (`add_classifier`, saved in
    ``classifiers/<name>/``) add ∇ log p(y | z_t) to the score; several multiply (a product of
    experts) and combine with classes, sources and ``guidance_scale``.

    Config (in ``model_index.json``): ``prediction_type`` (default: the scheduler's), ``max_length``
    (tokens kept by `encode`), ``decode_kwargs`` (generation arguments, over `text_codec.DEFAULT_GENERATE_KWARGS`)
    and ``infill_decode_kwargs`` (those of gap fillings, ``pipe(infill=...)``, over ``decode_kwargs``).
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
        infill_decode_kwargs: dict[str, Any] | None = None,
        segments: bool = False,
        segment_context: str = "text",
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
            prediction_type=prediction_type,
            max_length=int(max_length),
            decode_kwargs=dict(decode_kwargs or {}),
            infill_decode_kwargs=dict(infill_decode_kwargs or {}),
            segments=bool(segments),
            segment_context=str(segment_context),
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
        num_samples: int | None = None,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        *,
        options: SamplingOptions | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "text",
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        return_dict: bool = True,
        controls: dict[str, Any] | None = None,
        source_texts: str | list[str] | None = None,
        num_samples_per_source: int = 1,
        source_states: SourceStates | None = None,
        num_segments: int | None = None,
        prompt_texts: list[str] | None = None,
        infill: list[tuple[str, str]] | None = None,
        **option_changes,
    ) -> LatentTextDiffusionPipelineOutput | tuple:
        r"""Sample texts.

        Args:
            num_samples: batch size ``B`` (default 1); with sources ``B = len(source_texts) *
                num_samples_per_source`` (leave it unset).
            class_labels: ``None``, one label for all samples or ``B`` labels (names or ids).
            options: how to sample (`SamplingOptions`); any of its fields may also be given as a keyword,
                e.g. ``guidance_scale=2.0``. Every call steps its own copy of the scheduler.
            generator, latents: the initial noise ``[B, num_latents, latent_dim]`` and stochastic steps.
            output_type: ``"text"`` or ``"latent"`` (no decoding; ``texts`` is ``None``).
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` after each step; a
                returned ``"latents"`` (next ``z_t``) or ``"pred_original_sample"`` (ẑ0) replaces the
                current one. ``callback_on_step_end_tensor_inputs``: the names it receives.
            return_dict: a `LatentTextDiffusionPipelineOutput` instead of a tuple.
            controls: classifier guidance ``{name: target}`` (one or ``B``), weighted by ``control_scale``.
            source_texts, num_samples_per_source: text-to-text: the sources, and texts per source;
                ``source_states``: sources made outside the call instead (`SourceStates`).
            num_segments, prompt_texts, infill: long texts of a pipeline trained on segments
                (`LongTextMixin.write_long_text`).

        Returns:
            `LatentTextDiffusionPipelineOutput` (``texts``, ``latents``: the last ẑ0 ``[B, N, D]``) or a tuple.
        """
        options = SamplingOptions.of(options, **option_changes)
        long_text = dict(num_segments=num_segments, prompt_texts=prompt_texts, infill=infill)
        if any(value is not None for value in long_text.values()):
            return self.write_long_text(
                num_samples, class_labels, **long_text, generator=generator, options=options, return_dict=return_dict
            )
        # 0. Check inputs.
        sources, num_samples = self.call_sources(source_texts, source_states, num_samples, options)
        num_samples = count_outputs(sources, num_samples, num_samples_per_source, options.mbr_candidates, output_type)
        self.check_inputs(num_samples, output_type, callback_on_step_end_tensor_inputs)
        scheduler = copy.deepcopy(make_scheduler(self.scheduler, options.scheduler))  # step() keeps state
        self.check_scheduler(scheduler)
        controls = prepare_controls(self.classifiers, controls, options.control_scale, num_samples)
        for control in controls:  # every returned text has mbr_candidates candidates, drawn side by side
            control.target = control.target.repeat_interleave(options.mbr_candidates)
        # 1. Conditions, with the unconditional half first when guiding (one batched forward pass).
        labels, context = self.prepare_conditions(
            class_labels, sources, num_samples, num_samples_per_source, options.mbr_candidates, options.guidance_scale
        )
        # 2. Initial noise.
        config = self.denoiser.config
        shape = (num_samples * options.mbr_candidates, config.num_latents, config.latent_dim)
        latents = self.prepare_latents(shape, generator, self._execution_device, latents, scheduler)

        # 3. Denoising loop, then 4. decoding (and each output's MBR choice).
        callback = (callback_on_step_end, callback_on_step_end_tensor_inputs)
        texts = None
        with refuse_out_of_memory(shape[0]):
            latents = self.denoise(latents, scheduler, generator, options, labels, context, controls, callback)
            if output_type == "text":
                texts, latents = self.decode_outputs(latents, options, num_samples_per_source, sources)
        self.maybe_free_model_hooks()

        if not return_dict:
            return texts, latents
        return LatentTextDiffusionPipelineOutput(texts=texts, latents=latents)

    # ------------------------------------------------------------------------------------------
    # Helpers of __call__ (public so that subclasses and tests can use them)
    # ------------------------------------------------------------------------------------------

    def denoise(
        self, latents, scheduler, generator, options: SamplingOptions, labels, context, controls, callback
    ) -> torch.Tensor:
        """The reverse process from ``z_T`` (labels and context already carry the unconditional half when
        guiding; ``callback``: ``(callback_on_step_end, its tensor names)``); returns the last clean
        estimate ẑ0 ``[B, N, D]``.

        The sample is that estimate, as in LD4LG: a DDPM step with few inference steps and variance
        "fixed_large" would otherwise add noise of std sqrt(1 - ᾱ_t) on its final jump to t=0;
        deterministic schedulers end at (or next to) this estimate anyway.
        """
        num_inference_steps, guidance_scale = options.num_inference_steps, options.guidance_scale
        callback_on_step_end, callback_on_step_end_tensor_inputs = callback
        if num_inference_steps > scheduler.config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} exceeds the {scheduler.config.num_train_timesteps} "
                "timesteps the denoiser was trained on (num_train_timesteps); use at most that many steps."
            )
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        step_kwargs = extra_step_kwargs(scheduler, generator)
        prediction_type = self.config.prediction_type
        if options.clamp_latents and not self.autoencoder.config.normalize_latents:
            raise ValueError(
                "clamp_latents=True puts ẑ0 on the sphere of normalized latents, but this autoencoder does not "
                "normalize its latents (normalize_latents=False): sample with clamp_latents=False."
            )
        use_self_cond = bool(self.denoiser.config.get("self_conditioning", False))
        pred_original_sample = None  # ẑ0 of the previous step, fed back (self-conditioning)
        low, high = options.guidance_interval
        # which steps are guided, read from the timesteps once (no host-device sync inside the loop)
        guided = [low <= t / scheduler.config.num_train_timesteps <= high for t in scheduler.timesteps.tolist()]
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            # Euler-type schedulers keep latents at sigma scale; the denoiser sees DDPM-scale z_t.
            model_input = scheduler.scale_model_input(latents, t)
            self_cond = pred_original_sample if use_self_cond else None
            guide = guided[i]
            model_output = self.guided_model_output(model_input, t, self_cond, labels, guidance_scale, context, guide)
            if controls:
                gradient = control_gradient(controls, model_input, t)
                model_output = guide_model_output(
                    scheduler, model_output, model_input, t, gradient, prediction_type=prediction_type
                )
            # ẑ0 of the guided prediction (Euler: from the rescaled model input, which is z_t).
            pred_original_sample = predict_original_sample(
                scheduler, model_output, model_input, t, prediction_type=prediction_type
            )
            if options.clamp_latents:  # the step goes on from ẑ0 on the latent sphere (Diffusion-LM's clamping)
                pred_original_sample = self.autoencoder.project(pred_original_sample)
                model_output = model_output_from_original_sample(
                    scheduler, pred_original_sample, model_input, t, prediction_type=prediction_type
                )
            latents = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=True).prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents, "pred_original_sample": pred_original_sample}
                try:
                    callback_outputs = (
                        callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                        or {}
                    )
                except Exception as err:
                    raise RuntimeError(
                        f"callback_on_step_end raised {type(err).__name__} at step {i} (timestep {int(t)}): {err}. "
                        "Nothing of the pipeline changed: fix the callback and call it again."
                    ) from err
                latents = callback_outputs.get("latents", latents)
                pred_original_sample = callback_outputs.get("pred_original_sample", pred_original_sample)
        return pred_original_sample

    def prepare_conditions(
        self, class_labels, sources, num_samples, num_samples_per_source, mbr_candidates, guidance_scale
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """Class ids ``[B']`` and source (states, mask) ``[B', L, C]``, ``[B', L]`` for the whole batch:
        ``B = num_samples * mbr_candidates``, and ``B' = 2B`` with guidance (the null class and no
        source first)."""
        labels = class_label_ids(self.class_names, class_labels, num_samples)
        do_guidance = guidance_scale != 1.0
        if do_guidance and labels is None and sources is None:
            if not self.class_names:
                raise ValueError(
                    f"guidance_scale={guidance_scale} needs a class-conditional or text-to-text denoiser, but this "
                    "one is unconditional. Use guidance_scale=1.0."
                )
            raise ValueError(f"guidance_scale={guidance_scale} needs class_labels (one of {self.class_names}).")
        context = None
        if isinstance(sources, SourceStates):
            repeats = num_samples_per_source * mbr_candidates
            context = sources.repeated(repeats, self._execution_device, self.denoiser.dtype)
        elif sources is not None:
            context = self.encode_sources(sources, repeats=num_samples_per_source * mbr_candidates)
        if context is not None and do_guidance:  # an all-zero mask leaves only the null context: no source
            states, mask = context
            context = (torch.cat([states, states]), torch.cat([torch.zeros_like(mask), mask]))
        if labels is not None:
            labels = labels.repeat_interleave(mbr_candidates).to(self._execution_device)
            if do_guidance:
                labels = torch.cat([torch.full_like(labels, self.denoiser.config.num_classes), labels])
        return labels, context

    def decode_outputs(self, latents, options: SamplingOptions, num_samples_per_source, sources):
        """Texts of the clean latents (a ``read_context`` decoder reads each one's source text before
        them); with MBR each output's chosen candidate (texts and latents), with sources the texts grouped
        per source."""
        kwargs = dict(options.decode_kwargs or {})
        if self.autoencoder.config.get("read_context") and isinstance(sources, list):
            kwargs["context_texts"] = [source for source in sources for _ in range(len(latents) // len(sources))]
        texts = self.decode(latents, **kwargs)
        if options.mbr_candidates > 1:
            chosen = mbr_select(texts, options.mbr_candidates, options.mbr_metric)
            texts, latents = [texts[i] for i in chosen], latents[chosen]
        if sources is not None and getattr(sources, "per_source", True):
            k = num_samples_per_source
            texts = [texts[i : i + k] for i in range(0, len(texts), k)]
        return texts, latents

    def check_inputs(self, num_samples, output_type, callback_on_step_end_tensor_inputs) -> None:
        check_call_arguments(num_samples, output_type, callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

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

    def guided_model_output(
        self, model_input, t, self_cond, labels, guidance_scale: float, context=None, guide: bool = True
    ) -> torch.Tensor:
        """The denoiser's prediction at ``t``; with guidance (``labels`` holding the null class first,
        then the classes; ``context`` = (source states, mask) with the no-source half first),
        ``uncond + w * (cond - uncond)`` from one batched forward pass. ``guide=False`` (a step outside
        the guidance interval) takes the conditional half alone."""
        do_guidance = guidance_scale != 1.0
        if do_guidance and not guide:
            labels = None if labels is None else labels.chunk(2)[1]
            context = None if context is None else tuple(part.chunk(2)[1] for part in context)
            do_guidance = False
        x, sc = model_input, self_cond
        if do_guidance:
            x = torch.cat([x, x])
            sc = None if sc is None else torch.cat([sc, sc])
        timestep = t.expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device)
        dtype = self.denoiser.dtype
        # The source goes in only when there is one, so denoisers without cross-attention keep their signature.
        source = {} if context is None else {"encoder_hidden_states": context[0], "encoder_attention_mask": context[1]}
        model_output = self.denoiser(
            x.to(dtype), timestep, self_cond=None if sc is None else sc.to(dtype), class_labels=labels, **source
        ).sample.float()
        if do_guidance:
            uncond, cond = model_output.chunk(2)
            model_output = uncond + guidance_scale * (cond - uncond)
        return model_output

    def check_scheduler(self, scheduler=None) -> None:
        """The scheduler must predict what the denoiser was trained for and work in alphas_cumprod."""
        check_scheduler(scheduler if scheduler is not None else self.scheduler, self.config.prediction_type)
