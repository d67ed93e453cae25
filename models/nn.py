"""Shared network primitives for the diffusion noise estimator (docs/method.md §3.2).

Small, stateless helpers in the style of guided-diffusion's ``nn.py``, written from the specification:
the sinusoidal timestep embedding, zero initialisation, the fp32 GroupNorm and the parameter-free
2x resampling used inside ResBlocks (``resblock_updown``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["timestep_embedding", "zero_module", "GroupNorm32", "normalization", "downsample2x",
           "upsample2x"]

GROUPS = 32  # GroupNorm(32) everywhere in the reference UNet


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of the raw (integer-valued) timestep, as in the reference UNet.

    Frequencies f_i = max_period^(-i/half), i = 0..half-1 with half = dim // 2; the embedding is
    ``[cos(t f), sin(t f)]`` (cosine half first), with a zero column appended when ``dim`` is odd.

    Args:
        t: (B,) timesteps, integer or float; used unscaled (t in 0..999, not t/T).
        dim: embedding width D (``model_channels`` = 128 in the paper).
        max_period: controls the lowest frequency (1e4).

    Returns:
        (B, D) float32 embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it.

    Used on the last conv of each ResBlock, the attention ``proj_out`` and the output conv, so that
    every residual branch starts as the identity and the untrained UNet outputs exactly 0.
    """
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, so that statistics stay accurate under autocast
    or half-precision weights (the reference does the same)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """GroupNorm(32, channels) in fp32. Raises ValueError if ``channels`` is not divisible by 32."""
    if channels % GROUPS:
        raise ValueError(f"GroupNorm({GROUPS}) needs channels divisible by {GROUPS}, got {channels}")
    return GroupNorm32(GROUPS, channels)


def downsample2x(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling, stride 2: (B, C, H, W) -> (B, C, H/2, W/2). No parameters."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2 up-sampling: (B, C, H, W) -> (B, C, 2H, 2W). No parameters."""
    return F.interpolate(x, scale_factor=2, mode="nearest")
