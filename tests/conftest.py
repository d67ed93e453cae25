"""Shared fixtures and helpers: the real sample pairs, the real DICOM, tiny synthetic folders, the
small pieces of the diffusion tests (seeded generators, the noise schedule, a linear ε-model, a tiny UNet),
and those of the stage tests (a tiny dataset, the smoke config, an untrained stage-2 checkpoint)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SZCH_SAMPLES = ROOT.parent / "shared" / "data" / "szch-samples"

# Tests never download: point torch hub at an empty folder unless the caller chose one.
os.environ.setdefault("TORCH_HOME", str(ROOT / ".pytest_cache" / "torch_home"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test tensors are tiny: on 2 cores, intra-op threads only add contention (up to 10x slower
    for small convolutions). Subprocess tests set OMP_NUM_THREADS themselves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def szch_samples() -> Path:
    """../shared/data/szch-samples (two real registered CXR/BS pairs); skips when absent."""
    if not (SZCH_SAMPLES / "CXR").is_dir():
        pytest.skip(f"real sample pairs not found at {SZCH_SAMPLES}")
    return SZCH_SAMPLES


@pytest.fixture
def dicom_chest() -> Path:
    """RG1_UNCR.dcm from pydicom-data: a real 15-bit MONOCHROME1 CR chest radiograph."""
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("RG1_UNCR.dcm", download=False)
    if path is None:  # pragma: no cover - pydicom-data is in requirements-dev.txt
        pytest.skip("RG1_UNCR.dcm not available (pip install pydicom-data)")
    return Path(path)


def write_gray(path: Path, arr: np.ndarray) -> Path:
    """Write a uint8/uint16 array as a PNG with Pillow directly (independent of data.io)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr if arr.dtype == np.uint16 else arr.astype(np.uint8)).save(path)
    return path


@pytest.fixture
def pair_folder(tmp_path) -> Path:
    """A dataset root with 10 random 32×32 pairs and masks: CXR/, BS/, Mask/."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    for i in range(10):
        name = f"case{i:02d}.png"
        cxr = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        write_gray(root / "CXR" / name, cxr)
        write_gray(root / "BS" / name, (cxr * 0.8).astype(np.uint8))
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 4:14] = 255
        mask[8:24, 18:28] = 255
        write_gray(root / "Mask" / name, mask)
    return root


def fill_disk_after(monkeypatch, n: int) -> list:
    """Make ``data.io``'s atomic writes fail with ENOSPC (a full disk) after ``n`` successful ones;
    returns the list of paths it was asked to write (the failing ones included)."""
    import errno

    import data.io

    real, calls = data.io.atomic_write, []

    def filling_disk(path, write, *inputs):
        calls.append(path)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write, *inputs)

    monkeypatch.setattr(data.io, "atomic_write", filling_disk)
    return calls


# ---- the diffusion tests: generators, schedule, ε-models ----------------------------------------------

def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sched():
    """The papers' noise schedule: 1000 steps, scaled linear."""
    from models.schedule import NoiseSchedule

    return NoiseSchedule(1000, "scaled_linear")


def conds(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A global and a local condition latent of ``shape``, drawn from one generator seeded 100."""
    g = gen(100)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


class LinearNet(nn.Module):
    """A cheap, exactly per-sample "ε-model": a fixed 1x1 conv of [x ; c] (8 channels), scaled with t.

    Its extra output channels (``out_channels`` > 4) have 10x the scale of the first four, so the std
    over 8 channels differs clearly from the std over 4. ``calls``: the batch size of every call.
    """

    def __init__(self, out_channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, out_channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen(7)) * 0.3)
            self.conv.bias.zero_()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        out = self.conv(x) * (1 + t.float()[:, None, None, None] / 1000)
        scale = torch.ones(out.shape[1])
        scale[4:] = 10.0
        return out * scale[None, :, None, None]


def tiny_unet(**overrides):
    """A tiny :class:`models.unet.UNetModel` (32-64 channels, attention after the first downsampling) on
    the 8-channel [x_t ; condition] input; ``overrides`` replace its arguments (default: 8 output
    channels, as the reference's)."""
    from models.unet import UNetModel

    kwargs = dict(in_channels=8, out_channels=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=2)
    kwargs.update(overrides)
    return UNetModel(**kwargs)


# ------------------------------------------------------------------------------------ stage tests

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
