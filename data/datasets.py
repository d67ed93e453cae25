"""Datasets over a bone-suppression folder, driven by split list files.

Layout of ``root`` (same file name = same case)::

    CXR/<name>          chest radiograph (input)
    BS/<name>           soft-tissue image (target)
    Mask/<name>         optional lung mask (0/255)
    Masked_CXR/<name>   optional lung-masked copies (GL-LCM's local path, §1.4)
    Masked_BS/<name>

Items are dicts of (1, S, S) float tensors in [-1, 1] plus the name and the original (H, W).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from data.io import DEFAULT_MAX_PIXELS, ImageError, read_image
from data.masking import binarize_mask
from data.splits import list_paths, read_list
from data.transforms import resize, to_model

CXR, BS, MASK, MASKED_CXR, MASKED_BS = "CXR", "BS", "Mask", "Masked_CXR", "Masked_BS"


def split_location(data_cfg) -> tuple[Path, str]:
    """(list_dir, prefix) of a :class:`utils.config.DataConfig`; empty fields default to root / name."""
    return Path(data_cfg.split.list_dir or data_cfg.root), data_cfg.split.prefix or data_cfg.name


def split_list(data_cfg, split: str) -> list[str]:
    """Names of one split ("train", "val" or "test") of the configured dataset."""
    list_dir, prefix = split_location(data_cfg)
    return read_list(list_paths(list_dir, prefix)[split])


def random_affine(generator: torch.Generator, max_rotate_deg: float = 5.0, max_scale: float = 0.05,
                  max_shift: float = 0.03) -> torch.Tensor:
    """A (1, 2, 3) affine matrix for ``F.affine_grid``: small rotation, isotropic scale and shift."""
    u = torch.rand(4, generator=generator) * 2 - 1
    a = math.radians(max_rotate_deg) * float(u[0])
    s = 1.0 + max_scale * float(u[1])
    c, si = math.cos(a) / s, math.sin(a) / s
    return torch.tensor([[[c, -si, max_shift * float(u[2])], [si, c, max_shift * float(u[3])]]])


def apply_affine(tensors: dict[str, torch.Tensor], theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Warp every (1, S, S) tensor of ``tensors`` with the same ``theta`` (masks with nearest)."""
    out = {}
    for key, x in tensors.items():
        grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
        mode = "nearest" if key == "mask" else "bilinear"
        # Out-of-field pixels become -1 (black), like the collimation borders of real radiographs.
        fill = 0.0 if key == "mask" else -1.0
        y = F.grid_sample(x[None] - fill, grid, mode=mode, padding_mode="zeros", align_corners=False)[0] + fill
        out[key] = y
    return out


class PairedDataset(Dataset):
    """(CXR, soft tissue) pairs of ``names`` under ``root``.

    Args:
        root: dataset folder.
        names: file names of the cases (a split list).
        image_size: model size S; images are resized to (S, S) (bilinear, masks nearest).
        invert: negative images (JSRT, §1.1).
        masked: read Masked_CXR / Masked_BS instead of CXR / BS (GL-LCM's masked pairs, §1.5).
        with_mask: also return the lung mask from Mask/.
        augment: light geometric augmentation (same small affine for every image of a pair).
        seed: seeds the augmentation; (seed, epoch, index) fixes each draw. Call set_epoch().
    Returns per item:
        {"cxr": (1,S,S), "bs": (1,S,S), ["mask": (1,S,S) in {0,1}], "name": str, "size": (H, W)}
    Raises:
        ImageError (at access): unreadable file, or CXR and BS (or mask) of different sizes.
    """

    def __init__(self, root: str | Path, names: list[str], image_size: int, invert: bool = False,
                 masked: bool = False, with_mask: bool = False, augment: bool = False, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.names = list(names)
        self.image_size = image_size
        self.invert = invert
        self.dirs = (MASKED_CXR, MASKED_BS) if masked else (CXR, BS)
        self.with_mask = with_mask
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        missing = [str(self.root / d) for d in (*self.dirs, *([MASK] if with_mask else [])) if not (self.root / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"dataset folder(s) not found: {', '.join(missing)}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        cxr = read_image(self.root / self.dirs[0] / name, self.max_pixels)
        bs = read_image(self.root / self.dirs[1] / name, self.max_pixels)
        if cxr.size != bs.size:
            raise ImageError(bs.path, f"size {bs.size} differs from its CXR {cxr.path} of size {cxr.size}")
        item = {"cxr": resize(to_model(cxr.pixels, self.invert), self.image_size),
                "bs": resize(to_model(bs.pixels, self.invert), self.image_size)}
        if self.with_mask:
            m = read_image(self.root / MASK / name, self.max_pixels)
            if m.size != cxr.size:
                raise ImageError(m.path, f"mask size {m.size} differs from its CXR {cxr.path} of size {cxr.size}")
            mask = torch.from_numpy(binarize_mask(m.pixels)).float()[None]
            item["mask"] = resize(mask, self.image_size, mode="nearest")
        if self.augment:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF)
            item = apply_affine(item, random_affine(g))
        item.update(name=name, size=cxr.size)
        return item


class ImageDataset(Dataset):
    """Single images for the autoencoder: every ``subdir``/``name`` pair, e.g. CXR ∪ BS (§1.5).

    Returns per item: {"image": (1, S, S) in [-1, 1], "name": str, "subdir": str, "size": (H, W)}.
    """

    def __init__(self, root: str | Path, names: list[str], subdirs: list[str] | tuple[str, ...], image_size: int,
                 invert: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        missing = [str(self.root / d) for d in subdirs if not (self.root / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"dataset folder(s) not found: {', '.join(missing)}")
        self.items = [(d, n) for d in subdirs for n in names]
        self.image_size = image_size
        self.invert = invert
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        subdir, name = self.items[index]
        img = read_image(self.root / subdir / name, self.max_pixels)
        return {"image": resize(to_model(img.pixels, self.invert), self.image_size),
                "name": name, "subdir": subdir, "size": img.size}
