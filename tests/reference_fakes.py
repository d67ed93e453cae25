"""Whole-model pickles shaped like the authors' published checkpoints, written for the converter tests.

The reference code is not installed (and never is): while a file is written, stand-in classes are
registered under the reference's module paths (``modules.unet``, ``generative.networks...``,
``monai.networks...``), so the pickle names exactly those classes, then removed again. The VQVAE is
built here from MONAI's layout (each conv inside a block with a ``.conv`` child, the ReLU inside the
block), independently of the converter's renaming, with its own forward pass to compare outputs.
"""
from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

_FAKE_CLASSES: dict[str, type] = {}


def fake_class(path: str, base: type = nn.Module) -> type:
    """A class whose pickled name is ``path`` (registered in sys.modules only inside :func:`registered`)."""
    if path not in _FAKE_CLASSES:
        module, name = path.rsplit(".", 1)
        _FAKE_CLASSES[path] = type(name, (base,), {"__module__": module, "__qualname__": name})
    return _FAKE_CLASSES[path]


@contextlib.contextmanager
def registered():
    """Install the fake classes' modules so that pickle can name them; remove them afterwards."""
    added = []
    for path, cls in _FAKE_CLASSES.items():
        parts = path.split(".")
        for i in range(1, len(parts)):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        setattr(sys.modules[cls.__module__], cls.__name__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def save_whole_model(model: nn.Module, path: Path, protocol: int = 2) -> Path:
    """``torch.save(model)``, as the reference code does."""
    with registered():
        torch.save(model, path, pickle_protocol=protocol)
    return path


# ---- the guided-diffusion UNet of the reference ----------------------------------------------------

def reference_unet(ours: nn.Module, legacy: bool) -> nn.Module:
    """A copy of one of our UNets whose classes are the reference's (``modules.unet.*``,
    ``modules.nn.GroupNorm32``), with each attention block's ``attention`` child being a
    ``QKVAttentionLegacy`` or ``QKVAttention`` (the only place the q/k/v order is recorded)."""
    import copy

    model = copy.deepcopy(ours)
    for m in model.modules():
        mod = type(m).__module__
        if mod.startswith("models."):
            base = nn.Sequential if isinstance(m, nn.Sequential) else (
                nn.GroupNorm if isinstance(m, nn.GroupNorm) else nn.Module)
            m.__class__ = fake_class(f"modules.{mod.split('.')[-1]}.{type(m).__name__}", base)
        if "resample" in m.__dict__:
            # The reference keeps up/down-sampling as parameter-free modules (h_upd, x_upd), not functions.
            up = m.__dict__.pop("resample")
            if up is not None:
                kind = "Upsample" if "up" in up.__name__ else "Downsample"
                m.h_upd, m.x_upd = fake_class(f"modules.unet.{kind}")(), fake_class(f"modules.unet.{kind}")()
        if type(m).__name__ == "AttentionBlock":
            m.attention = fake_class("modules.unet.QKVAttentionLegacy" if legacy else "modules.unet.QKVAttention")()
    return model


# ---- MONAI-Generative's VQVAE -------------------------------------------------------------------------

def _block(conv: nn.Module) -> nn.Module:
    """monai.networks.blocks.Convolution: a Sequential holding ``conv`` (and an ADN block, no tensors)."""
    b = fake_class("monai.networks.blocks.convolutions.Convolution", nn.Sequential)()
    b.add_module("conv", conv)
    b.add_module("adn", fake_class("monai.networks.blocks.acti_norm.ADN", nn.Sequential)())
    return b


def _unit(c: int, r: int) -> nn.Module:
    u = fake_class("generative.networks.nets.vqvae.VQVAEResidualUnit")()
    u.conv1 = _block(nn.Conv2d(c, r, 3, padding=1))
    u.conv2 = _block(nn.Conv2d(r, c, 3, padding=1))
    return u


def reference_vqvae(channels=(8, 16), res_channels=8, res_layers=2, embedding_dim=4, num_embeddings=16,
                    seed: int = 0) -> nn.Module:
    """A MONAI VQVAE layout with random weights (and a non-trivial EMA state)."""
    torch.manual_seed(seed)
    enc, dec = fake_class("generative.networks.nets.vqvae.Encoder")(), fake_class("generative.networks.nets.vqvae.Decoder")()
    blocks, prev = [], 1
    for ch in channels:
        blocks.append(_block(nn.Conv2d(prev, ch, 4, stride=2, padding=1)))
        blocks += [_unit(ch, res_channels) for _ in range(res_layers)]
        prev = ch
    blocks.append(_block(nn.Conv2d(prev, embedding_dim, 3, padding=1)))
    enc.blocks = nn.ModuleList(blocks)
    rev = list(reversed(channels))
    blocks = [_block(nn.Conv2d(embedding_dim, rev[0], 3, padding=1))]
    for i, ch in enumerate(rev):
        blocks += [_unit(ch, res_channels) for _ in range(res_layers)]
        blocks.append(_block(nn.ConvTranspose2d(ch, rev[i + 1] if i + 1 < len(rev) else 1, 4, stride=2, padding=1)))
    dec.blocks = nn.ModuleList(blocks)
    ema = fake_class("generative.networks.layers.vector_quantizer.EMAQuantizer")()
    ema.embedding = nn.Embedding(num_embeddings, embedding_dim)
    ema.register_buffer("ema_cluster_size", torch.rand(num_embeddings))
    ema.register_buffer("ema_w", torch.randn(num_embeddings, embedding_dim))
    quant = fake_class("generative.networks.layers.vector_quantizer.VectorQuantizer")()
    quant.quantizer = ema
    vq = fake_class("generative.networks.nets.vqvae.VQVAE")()
    vq.encoder, vq.quantizer, vq.decoder = enc, quant, dec
    vq.num_res_layers = res_layers
    return vq


def _unit_forward(u: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.relu(x + u.conv2.conv(F.relu(u.conv1.conv(x))))


@torch.no_grad()
def reference_vqvae_reconstruct(vq: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI's eval-mode reconstruction: encode, nearest code, decode (ReLU inside every level's block)."""
    r, enc = vq.num_res_layers, list(vq.encoder.blocks)
    for i in range(0, len(enc) - 1, 1 + r):
        x = F.relu(enc[i].conv(x))
        for u in enc[i + 1:i + 1 + r]:
            x = _unit_forward(u, x)
    z = enc[-1].conv(x)
    book = vq.quantizer.quantizer.embedding.weight
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    idx = torch.cdist(flat, book).argmin(1)
    z = book[idx].reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    dec = list(vq.decoder.blocks)
    x = dec[0].conv(z)
    levels = (len(dec) - 1) // (1 + r)
    for i in range(levels):
        start = 1 + i * (1 + r)
        for u in dec[start:start + r]:
            x = _unit_forward(u, x)
        x = dec[start + r].conv(x)
        if i < levels - 1:
            x = F.relu(x)
    return x


# ---- hostile files ------------------------------------------------------------------------------------

class Payload:
    """Unpickling this calls ``os.system(command)``: the classic code-running pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)
