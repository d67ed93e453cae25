"""Patch-GAN discriminator of the ML-VQGAN stage (docs/method.md §2.2).

Reproduces MONAI-Generative's ``PatchDiscriminator(spatial_dims=2, in_channels=1, num_layers_d=3,
num_channels=64)`` with its defaults (kernel 4, padding 1, LeakyReLU 0.2, BatchNorm, no bias in the
normed convs), written from the specification:

    layer  conv                      after
    1      C_in -> 64,  s2, bias     LReLU(0.2)          (no norm)
    2      64  -> 128,  s2           BN + LReLU(0.2)
    3      128 -> 256,  s2           BN + LReLU(0.2)
    4      256 -> 512,  s1           BN + LReLU(0.2)
    5      512 -> 1,    s1, bias     -                   (logits)

2,763,585 parameters; a 1024^2 image gives 1 x 126 x 126 logits (64^2 gives 6 x 6).
Weights are initialised as in pix2pix / MONAI: conv weights N(0, 0.02), BN weight N(1, 0.02), BN bias 0
(conv biases keep PyTorch's default).

BatchNorm under DDP: each rank normalises with its own batch statistics. Convert with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` if the per-rank batch is small.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator returning a map of real/fake logits.

    Args:
        in_channels: image channels.
        num_layers: normed layers after the first conv (3 in the paper). Widths double each layer;
            all use stride 2 except the last, which uses stride 1.
        num_channels: width of the first conv (64).
        kernel_size, padding: of every conv (4 and 1).
        negative_slope: of the LeakyReLUs (0.2).

    Shapes: (B, in_channels, H, W) -> (B, 1, h, w) with, for kernel 4 / padding 1,
        h = H / 2**num_layers - 2 (H divisible by 2**num_layers), e.g. 1024 -> 126, 64 -> 6.

    Raises:
        ValueError: on non-positive sizes.
    """

    def __init__(self, in_channels: int = 1, num_layers: int = 3, num_channels: int = 64,
                 kernel_size: int = 4, padding: int = 1, negative_slope: float = 0.2) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_layers", num_layers),
                            ("num_channels", num_channels), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, num_channels, kernel_size, stride=2, padding=padding),
            nn.LeakyReLU(negative_slope),
        ]
        ch = num_channels
        for i in range(num_layers):
            stride = 1 if i == num_layers - 1 else 2
            # No conv bias: BatchNorm's shift makes it redundant.
            layers += [nn.Conv2d(ch, 2 * ch, kernel_size, stride=stride, padding=padding, bias=False),
                       nn.BatchNorm2d(2 * ch), nn.LeakyReLU(negative_slope)]
            ch *= 2
        layers.append(nn.Conv2d(ch, 1, kernel_size, stride=1, padding=padding))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, h, w); > 0 leans "real". Only the final map is returned."""
        return self.layers(x)


def _init_weights(m: nn.Module) -> None:
    """pix2pix / DCGAN initialisation, the MONAI PatchDiscriminator default."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
