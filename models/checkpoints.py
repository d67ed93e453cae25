"""The one loader per stage: a trained model rebuilt from the config inside its checkpoint.

Both read a ``.pt`` checkpoint of this project or a release ``.safetensors`` file
(:func:`utils.checkpoint.load_checkpoint`, which refuses anything else) and return the model frozen, in
eval mode, on ``device``, with the :class:`utils.config.Config` it was trained with.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.schedule import build_schedule, eps_model
from models.unet import build_unet
from models.vqgan import VQGAN, build_vqgan
from utils.checkpoint import CheckpointError, load_checkpoint, load_state
from utils.config import Config, config_from_dict, load_config

__all__ = ["load_vqgan", "load_ldm", "fixed_by_checkpoint", "checkpoint_config"]

# What a trained model fixes: its size and intensity convention, architectures, schedule and training.
# An evaluation (ldm_eval.py, the DICOM node) may not override these.
FIXED_KEYS = ("data.image_size", "data.invert")
FIXED_SECTIONS = ("vqgan.", "unet.", "diffusion.", "discriminator.", "vq_loss.", "vq_train.", "ldm_train.", "distill.")


def fixed_by_checkpoint(key: str) -> bool:
    """Keys an evaluation cannot change (``ldm_train.vqgan_ckpt`` can: it picks the first stage file)."""
    return key != "ldm_train.vqgan_ckpt" and (key in FIXED_KEYS or key.startswith(FIXED_SECTIONS))


def load_vqgan(path: str | Path, device: torch.device | str = "cpu") -> tuple[VQGAN, Config]:
    """A trained stage-1 VQGAN, rebuilt from the config inside its checkpoint, frozen, in eval mode.

    Raises:
        utils.checkpoint.CheckpointError: not a VQGAN checkpoint of this project, or unsafe.
    """
    ckpt = load_checkpoint(path, kind="vqgan")
    cfg = config_from_dict(ckpt["config"], source=f"{path} (config)")
    model = build_vqgan(cfg.vqgan)
    load_state(model, ckpt["state"]["model"], path, "model")
    return model.to(device).eval().requires_grad_(False), cfg


def load_ldm(path: str | Path, device: torch.device | str = "cpu", weights: str = "ema",
             as_eps: bool = True) -> tuple[torch.nn.Module, Config]:
    """A trained stage-2 UNet (latent (B, 8, S/f, S/f) [x_t ; condition] -> (B, out_channels, S/f, S/f)),
    rebuilt from the config inside its checkpoint, frozen, in eval mode, and that config.

    Args:
        weights: ``"ema"`` (the evaluation weights) or ``"raw"`` (the trained ones, slot ``unet``).
        as_eps: seen through :func:`models.schedule.eps_model`, so that it predicts ε also when it was
            trained to predict v (what samplers want); False gives the UNet itself (a distillation
            teacher, whose weights the student copies).

    Raises:
        utils.checkpoint.CheckpointError: not a stage-2 checkpoint of this project, unsafe, or without
            the requested weights (the message names the file and the other choice).
    """
    ckpt = load_checkpoint(path, kind="ldm")
    cfg = config_from_dict(ckpt["config"], source=f"{path} (config)")
    slot = "ema" if weights == "ema" else "unet"
    if slot not in ckpt["state"]:
        raise CheckpointError(f"{path}: holds no '{slot}' weights (it has {', '.join(sorted(ckpt['state']))}); "
                              f"use the {'raw' if slot == 'ema' else 'ema'} weights instead (ldm_eval.py --weights "
                              f"{'raw' if slot == 'ema' else 'ema'})")
    unet = build_unet(cfg.unet, image_size=ckpt["extra"]["latent_size"])
    load_state(unet, ckpt["state"][slot], path, weights)
    if as_eps:
        unet = eps_model(unet, build_schedule(cfg.diffusion), cfg.diffusion.prediction)
    return unet.to(device).eval().requires_grad_(False), cfg


def checkpoint_config(ckpt: str | Path, kind: str, config_files: list | None = None,
                      overrides: list[str] = ()) -> Config:
    """``config_files`` with ``overrides``, or else the config stored in the checkpoint with them."""
    if config_files:
        return load_config(config_files, overrides)
    # Only the config is needed: the weights stay on disk (memory-mapped).
    return config_from_dict(load_checkpoint(ckpt, kind=kind, lazy=True)["config"], f"{ckpt} (config)", overrides)
