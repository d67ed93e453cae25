"""Networks and losses, plus explicit builders from the typed configs (utils/config.py).

Builders take one config section each and return a ready module; nothing is built at import time.
The checkpoint loaders (one per stage) live in :mod:`models.checkpoints`.
"""
from __future__ import annotations

import torch.nn as nn

from models.checkpoints import load_ldm, load_vqgan
from models.discriminator import PatchDiscriminator
from models.losses import HybridLoss
from models.unet import UNetModel, build_unet
from models.vqgan import VQGAN, build_vqgan
from utils.config import DiscriminatorConfig, VQLossConfig

__all__ = ["build_vqgan", "build_discriminator", "build_hybrid_loss", "build_unet", "count_parameters", "load_vqgan",
           "load_ldm", "VQGAN", "PatchDiscriminator", "HybridLoss", "UNetModel"]


def build_discriminator(cfg: DiscriminatorConfig, in_channels: int = 1) -> PatchDiscriminator:
    """Patch discriminator from ``model.discriminator``."""
    return PatchDiscriminator(in_channels=in_channels, num_layers=cfg.num_layers,
                              num_channels=cfg.num_channels)


def build_hybrid_loss(cfg: VQLossConfig, discriminator: nn.Module | None = None,
                      perceptual_net: nn.Module | None = None) -> HybridLoss:
    """VQGAN-stage loss from ``loss``; see :class:`models.losses.HybridLoss` for the arguments.

    Pass the discriminator only when ``cfg.adversarial_weight > 0``. Without an injected
    ``perceptual_net`` and with ``cfg.perceptual_weight > 0`` this needs the VGG-16 weights in the
    torch hub cache (FileNotFoundError otherwise).
    """
    return HybridLoss.from_config(cfg, discriminator=discriminator, perceptual_net=perceptual_net)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; by default including frozen ones such as the EMA codebook,
    which is how the papers count (38,326,533 for the K = 256 VQGAN)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

