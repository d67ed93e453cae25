"""Helpers for the stage tests: a tiny dataset, the smoke config, an untrained stage-2 checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import ROOT, write_gray
from utils.config import load_config

__all__ = ["tiny_dataset", "smoke_config", "untrained_ldm"]


def tiny_dataset(root: Path, n: int = 12, size: int = 40, seed: int = 0) -> Path:
    """n smooth random pairs (BS = 0.8 CXR) with two-rectangle "lung" masks, plus the split lists
    (and masked copies), via the data stage (what dataSegmentation.py runs)."""
    from stages.dataset import prepare_dataset

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        name = f"c{i:02d}.png"
        base = 0.5 + 0.3 * np.sin(2 * np.pi * (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)))
        cxr = np.clip(base + 0.05 * rng.standard_normal((size, size)), 0, 1)
        write_gray(root / "CXR" / name, (cxr * 255).astype(np.uint8))
        write_gray(root / "BS" / name, (cxr * 0.8 * 255).astype(np.uint8))
        mask = np.zeros((size, size), np.uint8)
        mask[size // 5: 4 * size // 5, size // 8: 3 * size // 8] = 255
        mask[size // 5: 4 * size // 5, 5 * size // 8: 7 * size // 8] = 255
        write_gray(root / "Mask" / name, mask)
    prepare_dataset(smoke_config(root, root.parent / "runs"), progress=False)
    return root


def smoke_config(data_root: Path, out_dir: Path, *overrides: str):
    return load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "smoke.yaml"],
                       [f"data.root={data_root}", f"run.out_dir={out_dir}", *overrides])


def untrained_ldm(folder: Path, data_root: Path, *overrides: str) -> Path:
    """A stage-2 checkpoint and its VQGAN (``folder/vqgan/best.pt``) built from the smoke config with
    seeded random weights, without training: for the tests of what happens around the model (writes,
    names, paths), where the pixels do not matter. Returns the stage-2 checkpoint's path."""
    import torch

    from models import build_unet, build_vqgan
    from utils.checkpoint import save_checkpoint
    from utils.config import config_to_dict

    torch.manual_seed(0)
    cfg = smoke_config(data_root, folder, *overrides)
    vq_path = folder / "vqgan" / "best.pt"
    vqgan = build_vqgan(cfg.vqgan)
    save_checkpoint(vq_path, kind="vqgan", step=0, epoch=0, config=config_to_dict(cfg),
                    state={"model": vqgan.state_dict()})
    cfg.ldm_train.vqgan_ckpt = str(vq_path)
    latent = cfg.data.image_size // vqgan.downsample_factor
    unet = build_unet(cfg.unet, image_size=latent).state_dict()
    path = folder / "ldm" / "checkpoints" / "best.pt"
    save_checkpoint(path, kind="ldm", step=0, epoch=0, config=config_to_dict(cfg), state={"unet": unet, "ema": unet},
                    extra={"latent_size": latent})
    return path
