"""tools.analysis: spectra and bands on known signals, offset-noise composition, and the figures of a tiny model."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tools import analysis
from models.schedule import offset_noise, randn
from stages.train_vqgan import train_vqgan
from tests.conftest import smoke_config, tiny_dataset
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.config import ConfigError

FIGURES = ("psd.png", "frequency_noise.png", "band_snr.png", "offset_noise.png")




# ----------------------------------------------------------------------------------- numerics

def test_white_noise_psd_is_flat_at_its_variance():
    x = 2.0 * torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))    # variance 4
    f, p = analysis.radial_psd(x, components=8)
    assert len(f) == 8 and f[0] == pytest.approx(0.5 / 16) and f[-1] == pytest.approx(0.5 - 0.5 / 16)
    np.testing.assert_allclose(p, 4.0, rtol=0.1)
    assert abs(analysis.power_law_exponent(f, p)) < 0.1


def test_psd_peak_components_cap_and_power_law():
    yy, xx = np.mgrid[0:32, 0:32]
    sine = np.cos(2 * np.pi * 8 * xx / 32)                         # 0.25 cycles/pixel, no DC
    f, p = analysis.radial_psd(sine, components=64)
    assert len(f) == 16                                             # capped at min(H, W) // 2
    assert f[np.argmax(p)] == pytest.approx(0.25, abs=0.5 / 16)
    assert analysis.radial_psd(sine + 5.0, 16)[1] == pytest.approx(p)    # the mean (DC) is left out
    # a 1/f² field has slope -2
    r = analysis.radial_frequency(64, 64)
    spec = np.where(r > 0, 1 / np.maximum(r, 1e-9), 0) * np.exp(2j * np.pi * np.random.default_rng(0).random((64, 64)))
    field = np.fft.ifft2(spec).real
    assert analysis.power_law_exponent(*analysis.radial_psd(field, 32)) == pytest.approx(-2.0, abs=0.3)
    with pytest.raises(ValueError, match="H, W >= 2"):
        analysis.radial_psd(np.zeros(5))


def test_band_split_and_band_power():
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    low, high = analysis.band_split(x, 0.125)
    torch.testing.assert_close(low + high, x)
    const = torch.full((1, 1, 8, 8), 3.0)
    lo, hi = analysis.band_split(const, 0.125)
    torch.testing.assert_close(lo, const)
    torch.testing.assert_close(hi, torch.zeros_like(const), atol=1e-6, rtol=0)
    bands = analysis.band_power(x, 0.125)
    assert sum(bands.values()) == pytest.approx(float((x.double() ** 2).mean()), rel=1e-9)   # Parseval
    # expected noise power per band (what band_snr.png uses) against many draws, with offset noise
    draws = offset_noise((4096, 4, 8, 8), 0.1, torch.Generator().manual_seed(2))
    measured, expected = analysis.band_power(draws, 0.2), analysis.noise_band_power(8, 8, 0.2, 0.1)
    for k in expected:
        assert measured[k] == pytest.approx(expected[k], rel=0.08), k
    snr = analysis.band_snr({"dc": 1.0}, {"dc": 1.0}, np.array([0.5, 0.2]))
    np.testing.assert_allclose(snr["dc"], [1.0, 0.25])


def test_offset_noise_minus_eps_is_a_per_channel_constant():
    """The composition the figure shows: offset_noise draws ε first, so off − ε = c·δ, constant per channel."""
    shape = (2, 4, 8, 8)
    off = offset_noise(shape, 0.1, torch.Generator().manual_seed(5))
    eps = randn(shape, torch.Generator().manual_seed(5))
    const = off - eps
    torch.testing.assert_close(const, const[..., :1, :1].expand(shape))
    assert 0 < float(const.abs().max()) < 0.5


# ----------------------------------------------------------------------------------- figures of a tiny model

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(VQGAN checkpoint, an LDM-kind checkpoint whose config points at it). tools.analysis reads only the
    LDM checkpoint's config (data, VQGAN, schedule), so its UNet weights are not needed here."""
    base = tmp_path_factory.mktemp("analysis")
    root = tiny_dataset(base / "ds")
    vq_run = train_vqgan(smoke_config(root, base / "runs", "vq_train.epochs=1"), progress=False)
    vq = vq_run / "checkpoints" / "best.pt"
    cfg = load_checkpoint(vq)["config"]
    cfg["ldm_train"]["vqgan_ckpt"] = str(vq)
    cfg["diffusion"]["beta_schedule"] = "cosine"
    ldm = base / "ldm.pt"
    save_checkpoint(ldm, kind="ldm", step=0, epoch=0, config=cfg, state={"ema": {"w": torch.zeros(1)}}, extra={"latent_size": 8})
    return vq, ldm


def _png_ok(path):
    assert path.is_file() and path.stat().st_size > 5000, path
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


@pytest.mark.parametrize("which", ["ldm", "vqgan"])
def test_figures_and_summary(checkpoints, tmp_path, which):
    vq, ldm = checkpoints
    ckpt = ldm if which == "ldm" else vq
    summary = analysis.main(ckpt, tmp_path, split="train", n=3, components=64, timesteps=(100, 900), seed=3)
    for f in FIGURES:
        _png_ok(tmp_path / f)
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["kind"] == which and len(saved["names"]) == 3 and saved["latent_shape"] == [4, 8, 8]
    assert saved["schedule"] == ("cosine" if which == "ldm" else "scaled_linear")
    assert saved["components"]["used"] == {"soft-tissue images": 16, "VQ latents": 4, "Gaussian noise N(0, I)": 4}
    assert set(saved["band_snr"]) == {"100", "900"}
    # offset noise raises the noise power of the mean, so its SNR is lower at every t
    for t in ("100", "900"):
        assert saved["band_snr"][t]["offset"]["dc"] <= saved["band_snr"][t]["plain"]["dc"]
    mv = saved["mean_variance"]
    assert mv["offset_measured"] == pytest.approx(mv["offset_theory"], rel=0.15)
    rows = list(csv.DictReader(open(tmp_path / "psd.csv")))
    assert len(rows) == 16 + 4 + 4 and {r["signal"] for r in rows} == set(saved["psd_slope"])
    assert summary["offset_coefficient"] == 0.1


def test_errors(checkpoints, tmp_path):
    vq, ldm = checkpoints
    with pytest.raises(ValueError, match="cutoff"):
        analysis.main(vq, tmp_path, cutoff=0.7)
    with pytest.raises(ValueError, match="timesteps"):
        analysis.main(vq, tmp_path, split="train", n=1, timesteps=(1000,))
    with pytest.raises(ConfigError, match="unknown key"):
        analysis.main(vq, tmp_path, overrides=["data.nme=x"])
    with pytest.raises(CheckpointError, match="not found"):
        analysis.main(tmp_path / "none.pt", tmp_path)
    assert not any(tmp_path.glob("*.png"))
