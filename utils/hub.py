"""Pretrained ImageNet weights from the torch hub cache, never downloaded at run time.

LPIPS (metrics, AlexNet) and the perceptual loss (LPIPS-VGG) need torchvision ImageNet backbones.
This project never downloads: callers check with :func:`require_hub_file` at start-up, so that a
run stops before any work with a message naming the file and where to put it.
"""
from __future__ import annotations

from pathlib import Path

import torch

# torchvision's file names for the backbones the lpips package loads.
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
VGG16_FILE = "vgg16-397923af.pth"


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch.hub looks for ``filename``: ``$TORCH_HOME/hub/checkpoints/`` (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def missing_weights_message(filename: str, what: str) -> str:
    path = hub_checkpoint_path(filename)
    return (f"{what} needs the ImageNet weights file {filename}, which is not in the torch hub cache "
            f"and cannot be downloaded here: place it at {path} (or set TORCH_HOME)")


def require_hub_file(filename: str, what: str) -> Path:
    """Return the cached file's path, or raise FileNotFoundError naming the file and where to put it."""
    path = hub_checkpoint_path(filename)
    if not path.is_file():
        raise FileNotFoundError(missing_weights_message(filename, what))
    return path
