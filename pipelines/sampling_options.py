"""`SamplingOptions`: how a `LatentTextDiffusionPipeline` samples, as one object.

The pipeline call, `latentlm.sample`, `latentlm.evaluate`, the MLflow model and the command line all
take it whole; the command line's arguments and the MLflow parameter schema are derived from its
fields, so a new option is one field here and its use in the pipeline.

```python
from latentlm.pipelines import SamplingOptions

options = SamplingOptions(num_inference_steps=25, guidance_scale=2.0)
texts = pipe(num_samples=4, class_labels="tweet", options=options).texts
texts = pipe(num_samples=4, class_labels="tweet", guidance_scale=2.0).texts  # the same: fields as keywords
```
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from latentlm.pipelines.mbr import MBR_METRICS

__all__ = ["SCHEDULERS", "SamplingOptions", "make_scheduler"]

#: Scheduler names a `SamplingOptions.scheduler` may give -> (diffusers class name, extra config).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def make_scheduler(default_scheduler, name):
    """The scheduler one call steps: ``None`` gives ``default_scheduler`` (the pipeline's own), a name
    from `SCHEDULERS` a new one built from its config, and a scheduler instance is returned as it is."""
    if not hasattr(default_scheduler, "set_timesteps"):
        raise TypeError(
            f"make_scheduler takes a scheduler to build from (the pipeline's: pipe.scheduler), got "
            f"{type(default_scheduler).__name__}."
        )
    if name is None:
        return default_scheduler
    if not isinstance(name, str):
        return name
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    class_name, extra = SCHEDULERS[key]
    return getattr(diffusers, class_name).from_config(default_scheduler.config, **extra)


def _json_object(text: str) -> dict[str, Any]:
    """A command-line value that is a JSON object (``--decode-kwargs``)."""
    import argparse
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not JSON ({error}); give an object such as '{{\"top_p\": 0.9}}'."
        ) from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; give one such as '{{\"top_p\": 0.9}}'.")
    return value


def _help(text: str, flag: str | None = None, mlflow_type: str | None = None) -> dict:
    """A field's metadata: its help text, its command-line flag, and the MLflow parameter type of the
    fields the served model takes."""
    return {"help": text, "flag": flag, "mlflow_type": mlflow_type}


@dataclass(frozen=True)
class SamplingOptions:
    """How a pipeline samples. Every field has the default a plain ``pipe(...)`` call uses."""

    num_inference_steps: int = field(default=50, metadata=_help("scheduler steps", "--steps", mlflow_type="long"))
    scheduler: Any = field(
        default=None,
        metadata=_help(
            f"{' | '.join(SCHEDULERS)}, a diffusers scheduler instance, or None for the pipeline's own "
            "(a trained pipeline saves DPM-Solver++)",
            "--scheduler",
            mlflow_type="string",
        ),
    )
    guidance_scale: float = field(
        default=1.0,
        metadata=_help(
            "classifier-free guidance uncond + w * (cond - uncond) on the class and the source (1 = none)",
            "--guidance",
            mlflow_type="double",
        ),
    )
    guidance_interval: tuple[float, float] = field(
        default=(0.0, 1.0),
        metadata=_help(
            "guide only the steps whose noise level t/T lies in [LOW, HIGH] (default 0 1: every step)",
            "--guidance-interval",
            mlflow_type="double",
        ),
    )
    clamp_latents: bool = field(
        default=False,
        metadata=_help(
            "Diffusion-LM's clamping trick: every step's ẑ0 is put on the sphere the autoencoder writes its "
            "latents to (each vector of norm sqrt(latent_dim)) before the scheduler steps from it; needs an "
            "autoencoder with normalize_latents",
            "--clamp-latents",
            mlflow_type="boolean",
        ),
    )
    control_scale: float | dict[str, float] = field(
        default=1.0,
        metadata=_help("weight of the classifier-guidance controls (a number or {name: number})", "--control-scale"),
    )
    decode_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata=_help(
            "generation arguments over the pipeline's saved decode_kwargs (and, filling gaps, its "
            "infill_decode_kwargs), as a JSON object on the command line "
            '(e.g. \'{"do_sample": true, "top_p": 0.95}\')',
            "--decode-kwargs",
        ),
    )
    mbr_candidates: int = field(
        default=1, metadata=_help("MBR decoding: candidates per returned text (1 = off)", "--mbr")
    )
    mbr_metric: str = field(
        default="bleu", metadata=_help(f"MBR similarity: {' | '.join(MBR_METRICS)}", "--mbr-metric")
    )
    infill_candidates: int = field(
        default=1,
        metadata=_help(
            "filling gaps: fillings drawn per gap; the one after which the language model finds the text after "
            "the gap likeliest is kept (1 = the one drawn)",
            "--infill-candidates",
        ),
    )
    cut_sentence_logprob: float | None = field(
        default=None,
        metadata=_help(
            "long texts: a segment after whose words the language model gives its closing . ! or ? a "
            'log-probability below this counts as cut short ("... because she.") and is drawn again, as an '
            "unfinished one is (a causal LM; e.g. -10; default: off)",
            "--cut-sentence-logprob",
        ),
    )
    segment_retries: int = field(
        default=2,
        metadata=_help(
            "long texts: draw a segment again (new noise) where the decoder wrote it empty or unfinished (no "
            "closing . ! or ?; or cut short: cut_sentence_logprob), at most this many times (0 = never)",
            "--segment-retries",
            mlflow_type="long",
        ),
    )

    def __post_init__(self):
        if isinstance(self.guidance_interval, list):
            object.__setattr__(self, "guidance_interval", tuple(self.guidance_interval))
        self.check()

    # --------------------------------------------------------------------------------- building

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> SamplingOptions:
        """A copy with ``changes``; an unknown name is an error that lists the options."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise TypeError(f"unknown sampling options {unknown}; SamplingOptions has {list(self.field_names())}.")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def of(cls, options: SamplingOptions | None = None, **changes) -> SamplingOptions:
        """``options`` (default: the defaults) with ``changes``: what every caller that takes the options
        whole, and also a field as a keyword, does with them."""
        if options is not None and not isinstance(options, SamplingOptions):
            raise TypeError(f"options must be a SamplingOptions, got {type(options).__name__}.")
        return (options or cls()).replace(**changes)

    # ------------------------------------------------------------------------------- validation

    def check(self) -> None:
        """Every field's type and range; an error names the field and what it accepts."""
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}.")
        if isinstance(self.scheduler, str) and self.scheduler.lower() not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {self.scheduler!r}; choose one of {sorted(SCHEDULERS)}.")
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (1 = no guidance, 0 = unconditional), got {scale!r}."
            )
        pair = self.guidance_interval if isinstance(self.guidance_interval, tuple) else ()
        if (
            len(pair) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)
            or not 0 <= pair[0] <= pair[1] <= 1
        ):
            raise ValueError(
                "guidance_interval must be (low, high) with 0 <= low <= high <= 1, the noise levels t / T to guide "
                f"(default (0, 1): every step), got {self.guidance_interval!r}."
            )
        if not isinstance(self.clamp_latents, bool):
            raise ValueError(f"clamp_latents must be True or False, got {self.clamp_latents!r}.")
        candidates = self.mbr_candidates
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"mbr_candidates must be a positive integer, got {candidates!r}.")
        fillings = self.infill_candidates
        if isinstance(fillings, bool) or not isinstance(fillings, int) or fillings < 1:
            raise ValueError(f"infill_candidates must be a positive integer (1 = no choice), got {fillings!r}.")
        cut = self.cut_sentence_logprob
        if cut is not None and (isinstance(cut, bool) or not isinstance(cut, (int, float)) or not cut <= 0):
            raise ValueError(
                f"cut_sentence_logprob must be a log-probability (a number <= 0, e.g. -10) or None (off), got {cut!r}."
            )
        retries = self.segment_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(
                f"segment_retries must be an integer >= 0 (0 = never draw a segment again), got {retries!r}."
            )
        if self.mbr_metric not in MBR_METRICS:
            raise ValueError(f"mbr_metric={self.mbr_metric!r}: use one of {MBR_METRICS}.")
        if self.decode_kwargs is not None and not isinstance(self.decode_kwargs, dict):
            raise ValueError(f"decode_kwargs must be a dict of generation arguments, got {self.decode_kwargs!r}.")

    # ------------------------------------------------------------- the command line and MLflow

    @classmethod
    def add_arguments(cls, parser, exclude: tuple[str, ...] = ()) -> None:
        """One argparse option per field with a flag (but those in ``exclude``), its default and help
        from the field."""
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag is None or f.name in exclude:
                continue
            kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
            if isinstance(f.default, bool):
                kwargs["action"] = "store_true"
            elif f.name == "guidance_interval":
                kwargs.update(type=float, nargs=2, metavar=("LOW", "HIGH"))
            elif f.name == "cut_sentence_logprob":
                kwargs["type"] = float
            elif f.name == "decode_kwargs":
                kwargs.update(type=_json_object, metavar="JSON")
            elif f.name != "scheduler" and f.name != "mbr_metric":
                kwargs["type"] = type(f.default)
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_arguments(cls, args, **changes) -> SamplingOptions:
        """The options of parsed arguments (those `add_arguments` added) with ``changes``."""
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        return cls.of(**{**given, **changes})

    @classmethod
    def served_fields(cls) -> dict[str, tuple[str, Any]]:
        """The fields the MLflow model takes as parameters: ``{name: (MLflow type, default)}``."""
        return {
            f.name: (f.metadata["mlflow_type"], list(f.default) if isinstance(f.default, tuple) else f.default)
            for f in dataclasses.fields(cls)
            if f.metadata.get("mlflow_type")
        }
