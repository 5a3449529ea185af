"""Classifier guidance for `LatentTextDiffusionPipeline`: named `LatentClassifier` controls, their
targets checked once per call, and the gradient of their summed log-likelihoods at each step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from latentlm.diffusion.modeling_latent_classifier import LatentClassifier, latent_fingerprint

__all__ = ["Control", "check_classifier", "prepare_controls", "control_gradient"]


@dataclass
class Control:
    """One control of a call: the classifier, the target per sample and its scale."""

    name: str
    classifier: LatentClassifier
    target: torch.Tensor  # class ids (long) or values in the target's units (float), [B]
    scale: float


def check_classifier(name: str, classifier, num_latents: int, latent_dim: int, autoencoder) -> None:
    """A classifier must be a `LatentClassifier` over this pipeline's latent space."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a classifier needs a non-empty name, got {name!r}.")
    if not isinstance(classifier, LatentClassifier):
        raise TypeError(f"classifier {name!r} must be a LatentClassifier, got {type(classifier).__name__}.")
    shape = (classifier.config.num_latents, classifier.config.latent_dim)
    if shape != (num_latents, latent_dim):
        raise ValueError(
            f"classifier {name!r} reads latents of shape {list(shape)} but this pipeline's are "
            f"{[num_latents, latent_dim]}: it was trained on another autoencoder."
        )
    expected = classifier.config.autoencoder_fingerprint
    if expected is not None and expected != latent_fingerprint(autoencoder):
        raise ValueError(
            f"classifier {name!r} was trained on the latents of another autoencoder (fingerprint {expected}, "
            f"this pipeline's {latent_fingerprint(autoencoder)}). Train it on this pipeline's autoencoder "
            "(latentlm train-classifier with the run's config)."
        )


def _targets(name: str, classifier: LatentClassifier, value: Any, num_samples: int) -> torch.Tensor:
    values = list(value) if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) else [value]
    if len(values) == 1:
        values = values * num_samples
    if len(values) != num_samples:
        raise ValueError(f"controls[{name!r}] has {len(values)} targets for num_samples={num_samples}: give one or B.")
    if classifier.is_regression:
        for v in values:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
                raise ValueError(
                    f"controls[{name!r}] predicts a number ({classifier.config.target_name}); got {v!r}. "
                    "Pass an int or float."
                )
        return torch.tensor([float(v) for v in values])
    names = list(classifier.config.class_names)
    ids = []
    for v in values:
        if isinstance(v, str) and v in names:
            ids.append(names.index(v))
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < len(names):
            ids.append(int(v))
        else:
            raise ValueError(f"controls[{name!r}]: unknown class {v!r}; this classifier knows {names}.")
    return torch.tensor(ids, dtype=torch.long)


def prepare_controls(
    classifiers: dict[str, LatentClassifier], controls: dict[str, Any] | None, control_scale, num_samples: int
) -> list[Control]:
    """Check ``controls`` (name -> target) and ``control_scale`` (one number, or name -> number)."""
    if not controls:
        return []
    if not isinstance(controls, dict):
        raise TypeError(f"controls must be a dict of name -> target, got {type(controls).__name__}.")
    unknown = sorted(set(controls) - set(classifiers))
    if unknown:
        raise ValueError(
            f"unknown control(s) {unknown}; this pipeline carries {sorted(classifiers) or 'no classifiers'} "
            "(add one with pipe.add_classifier(name, LatentClassifier.from_pretrained(folder)))."
        )
    scales = control_scale if isinstance(control_scale, dict) else dict.fromkeys(controls, control_scale)
    stray = sorted(set(scales) - set(controls))
    if stray:
        raise ValueError(f"control_scale names {stray}, which are not in controls {sorted(controls)}.")
    out = []
    for name, value in controls.items():
        scale = scales.get(name, 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"control_scale for {name!r} must be a finite number >= 0, got {scale!r}.")
        classifier = classifiers[name]
        out.append(Control(name, classifier, _targets(name, classifier, value, num_samples), float(scale)))
    return out


def control_gradient(controls: list[Control], sample: torch.Tensor, timestep) -> torch.Tensor:
    """∇_{z_t} Σ_c scale_c · log p_c(y_c | z_t): a product of experts, one scale each. ``sample`` is the
    variance-preserving z_t the denoiser saw; ``[B, N, D]`` float32."""
    with torch.enable_grad():
        z = sample.detach().float().requires_grad_(True)
        total = z.new_zeros(())
        for control in controls:
            classifier = control.classifier
            if classifier.device != z.device:
                classifier.to(z.device)
            t = torch.as_tensor(timestep, device=z.device)
            t = t.expand(z.shape[0]) if t.dim() == 0 else t
            log_prob = classifier.log_likelihood(z, t, control.target.to(z.device))
            total = total + control.scale * log_prob.sum()
        (grad,) = torch.autograd.grad(total, z)
    return grad
