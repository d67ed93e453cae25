"""Networks and losses, plus explicit builders from the typed configs (utils/config.py).

Builders take one config section each and return a ready module; nothing is built at import time.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.discriminator import PatchDiscriminator
from models.losses import HybridLoss
from models.unet import UNetModel, build_unet
from models.vqgan import VQGAN
from utils.checkpoint import load_checkpoint, load_state
from utils.config import Config, DiscriminatorConfig, VQGANConfig, VQLossConfig, config_from_dict

__all__ = ["build_vqgan", "build_discriminator", "build_hybrid_loss", "build_unet", "count_parameters", "load_vqgan",
           "VQGAN", "PatchDiscriminator", "HybridLoss", "UNetModel"]


def build_vqgan(cfg: VQGANConfig) -> VQGAN:
    """ML-VQGAN from ``model.vqgan``; out_channels = in_channels. Raises ValueError on bad values."""
    return VQGAN(in_channels=cfg.in_channels, channels=cfg.channels,
                 num_res_channels=cfg.num_res_channels, num_res_layers=cfg.num_res_layers,
                 embedding_dim=cfg.embedding_dim, num_embeddings=cfg.num_embeddings,
                 commitment_cost=cfg.commitment_cost, decay=cfg.decay, epsilon=cfg.epsilon)


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


def load_vqgan(path, device: torch.device | str = "cpu") -> tuple[VQGAN, Config]:
    """A trained stage-1 VQGAN, rebuilt from the config inside its checkpoint, frozen, in eval mode.

    Raises:
        utils.checkpoint.CheckpointError: not a VQGAN checkpoint of this project, or unsafe.
    """
    ckpt = load_checkpoint(path, kind="vqgan")
    cfg = config_from_dict(ckpt["config"], source=f"{path} (config)")
    model = build_vqgan(cfg.vqgan)
    load_state(model, ckpt["state"]["model"], path, "model")
    return model.to(device).eval().requires_grad_(False), cfg
