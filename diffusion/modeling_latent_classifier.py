"""LatentClassifier: predicts an attribute of the text from noisy latents z_t and the timestep t, for
classifier guidance (Dhariwal & Nichol 2021; Diffusion-LM's plug-and-play control) over latents."""

from __future__ import annotations

import hashlib

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["LatentClassifier", "CLASSIFIER_TASKS", "latent_fingerprint"]

#: ``classification``: logits over ``class_names``; ``regression``: one number (e.g. length in tokens),
#: predicted in units of ``(y - target_mean) / target_std``.
CLASSIFIER_TASKS = ("classification", "regression")


def latent_fingerprint(autoencoder: nn.Module) -> str:
    """sha256 (16 hex) of the weights a `LatentAutoencoder` compresses with (its
    ``compression_parameters``) in float32: which latent space a classifier was trained on. The same
    weights in another dtype, or a reconstruction side trained on since (``freeze_compression``),
    give the same fingerprint."""
    compression = {id(p) for p in autoencoder.compression_parameters()}
    digest = hashlib.sha256()
    for name, tensor in sorted(autoencoder.named_parameters()):
        if id(tensor) in compression:
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class LatentClassifier(ModelMixin, ConfigMixin):
    """A small transformer over the latent tokens of ``z_t``; the timestep's embedding is added to every
    token, the tokens are mean-pooled, and a linear head gives class logits or one regression value.

    ``autoencoder_fingerprint`` (`latent_fingerprint`) names the latent space it was trained on, so a
    pipeline refuses a classifier of another autoencoder.
    """

    @register_to_config
    def __init__(
        self,
        num_latents: int = 32,
        latent_dim: int = 64,
        hidden_size: int = 256,
        num_layers: int = 3,
        num_heads: int = 4,
        ff_mult: int = 4,
        dropout: float = 0.1,
        task: str = "classification",
        class_names: list[str] | None = None,
        target_name: str = "label",
        target_mean: float = 0.0,
        target_std: float = 1.0,
        autoencoder_fingerprint: str | None = None,
    ):
        super().__init__()
        if task not in CLASSIFIER_TASKS:
            raise ValueError(f"task={task!r}: use one of {CLASSIFIER_TASKS}.")
        if task == "classification" and (not class_names or len(class_names) < 2):
            raise ValueError(f"a classification head needs at least 2 class_names, got {class_names!r}.")
        if task == "classification" and len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names must be unique, got {class_names}.")
        if target_std <= 0:
            raise ValueError(f"target_std must be > 0, got {target_std}.")
        self.input_proj = nn.Linear(latent_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.randn(1, num_latents, hidden_size) * 0.02)
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden_size, 4 * hidden_size, out_dim=hidden_size)
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, ff_mult * hidden_size, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, len(class_names) if task == "classification" else 1)

    @property
    def is_regression(self) -> bool:
        return self.config.task == "regression"

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """z_t ``[B, N, D]``, t ``[B]`` (or a scalar) -> logits ``[B, num_classes]`` or values ``[B]``
        (normalised: ``(y - target_mean) / target_std``)."""
        if sample.dim() != 3 or tuple(sample.shape[1:]) != (self.config.num_latents, self.config.latent_dim):
            raise ValueError(
                f"sample must be [batch, {self.config.num_latents}, {self.config.latent_dim}], got {tuple(sample.shape)}."
            )
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(sample.shape[0])
        # Sinusoidal features in float32 (large arguments), then the weights' dtype.
        time = self.time_embedding(self.time_proj(timestep.float()).to(self.input_proj.weight.dtype))
        hidden = self.input_proj(sample.to(self.input_proj.weight.dtype)) + self.pos_embed + time[:, None, :]
        pooled = self.norm_out(self.encoder(hidden).mean(dim=1))
        out = self.head(pooled)
        return out.squeeze(-1) if self.is_regression else out

    def log_likelihood(self, sample: torch.Tensor, timestep: torch.Tensor, target) -> torch.Tensor:
        """``log p(y | z_t)`` per sample ``[B]``: log-softmax of class ``target`` (an id per sample), or a
        unit-variance Gaussian around ``target`` (a value in the target's own units, per sample) in
        normalised units."""
        out = self(sample, timestep).float()
        if self.is_regression:
            y = (target.float() - self.config.target_mean) / self.config.target_std
            return -0.5 * (out - y) ** 2
        return out.log_softmax(dim=-1).gather(1, target.long()[:, None]).squeeze(1)

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Class ids ``[B]`` or values in the target's own units ``[B]``."""
        out = self(sample, timestep).float()
        if self.is_regression:
            return out * self.config.target_std + self.config.target_mean
        return out.argmax(dim=-1)
