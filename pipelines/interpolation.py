"""Paths between latents: what `LatentTextDiffusionPipeline.interpolate` decodes."""

from __future__ import annotations

import torch

__all__ = ["interpolation_path", "slerp"]

INTERPOLATION_METHODS = ("slerp", "lerp")


def interpolation_path(z_a: torch.Tensor, z_b: torch.Tensor, num_steps: int, method: str = "slerp") -> torch.Tensor:
    """``num_steps`` points from ``z_a`` to ``z_b`` ([1, N, D] each), ends included -> ``[num_steps, N, D]``.

    ``slerp`` interpolates each latent vector on the sphere (norms are kept, which matters for
    normalised latents); ``lerp`` interpolates linearly.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2 (both ends are included), got {num_steps}.")
    if method not in INTERPOLATION_METHODS:
        raise ValueError(f"method={method!r}: use one of {list(INTERPOLATION_METHODS)}.")
    weights = torch.linspace(0.0, 1.0, num_steps, device=z_a.device).view(-1, 1, 1)
    if method == "lerp":
        return (1 - weights) * z_a + weights * z_b
    return slerp(z_a, z_b, weights)


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
