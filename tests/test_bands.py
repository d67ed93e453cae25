"""Band-limited scores (metrics.gaussian_blur, highpass, band_bsr, band_energies, nodule_contrast) and
the tone-curve baseline (evaluation.tone_curve): the checks that tell bone removal from a change of tone."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

import evaluation as M
from data.io import read_image
from data.phantom import generate_phantom
from evaluation.tone_curve import apply_tone_curve, fit_from_folders, fit_tone_curve, write_tone_predictions


@pytest.mark.parametrize("sigma", [2.0, 5.0, 12.0])
def test_gaussian_blur_equals_reflect_convolution(sigma):
    x = np.random.default_rng(0).random((48, 64))
    ref = ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=10.0)
    assert np.abs(M.gaussian_blur(x, sigma) - ref).max() < 1e-6
    assert M.gaussian_blur(x, 0.0) is not None and np.array_equal(M.gaussian_blur(x, 0.0), x)


def test_gaussian_blur_keeps_constants_and_rejects_bad_input():
    assert np.allclose(M.gaussian_blur(np.full((20, 30), 0.3), 40.0), 0.3)   # sigma beyond the width: no wrap
    with pytest.raises(ValueError):
        M.gaussian_blur(np.zeros((2, 3, 4)), 1.0)
    with pytest.raises(ValueError):
        M.gaussian_blur(np.zeros((4, 4)), -1.0)


def _pair(size=128, seed=0):
    """A smooth 'tone' field plus sharp 'ribs': cxr = soft + bone."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    soft = 0.3 + 0.3 * xx + 0.02 * rng.standard_normal((size, size))
    ribs = 0.15 * (np.sin(2 * np.pi * 8 * yy) > 0.6)
    return soft + 0.1 + ribs, soft      # + 0.1: a display offset, pure tone


def test_band_bsr_target_identity_and_tone_only():
    cxr, soft = _pair()
    for scale in (32, 64):
        assert M.band_bsr(cxr, soft, soft, scale) == pytest.approx(1.0)
        assert M.band_bsr(cxr, soft, cxr, scale) == pytest.approx(0.0)
        # removing the offset (all the tone) leaves every rib: the band score stays ~0 ...
        assert abs(M.band_bsr(cxr, soft, cxr - 0.1, scale)) < 1e-9
        # ... while the energy BSR already credits it with a large share
        assert M.bsr_symmetric(cxr, soft, cxr - 0.1) > 0.2
        # adding structure that is in neither image scores below zero
        noisy = cxr + 0.05 * np.random.default_rng(1).standard_normal(cxr.shape)
        assert M.band_bsr(cxr, soft, noisy, scale) < 0


def test_band_bsr_is_resolution_invariant_and_masked():
    big = generate_phantom(3, 256)
    small = generate_phantom(3, 128)
    half = big.cxr - 0.5 * big.bone                       # half the bone removed: 1 - 0.25 = 0.75
    assert M.band_bsr(big.cxr, big.bs, half, 32) == pytest.approx(0.75)
    # the same anatomy at two sizes: the band holds the same share of the bone image
    e_big, e_small = (M.highpass(p.bone, 32) ** 2 for p in (big, small))
    share_big = e_big.sum() / (big.bone ** 2).sum()
    share_small = e_small.sum() / (small.bone ** 2).sum()
    assert share_small == pytest.approx(share_big, rel=0.35)
    assert M.band_bsr(big.cxr, big.bs, half, 32, big.mask) == pytest.approx(0.75)
    assert math.isnan(M.band_bsr(big.bs, big.bs, big.bs, 32))


def test_band_energies_add_up_and_split_tone_from_structure():
    cxr, soft = _pair()
    e = M.band_energies(cxr - soft)
    assert list(e)[0] == "tone" and list(e)[-1] == "fine" and len(e) == 7
    assert sum(e.values()) == pytest.approx(1.0)
    assert M.band_energies(np.full((32, 32), 0.2))["tone"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.band_energies(np.zeros((8, 8)))


def test_score_pair_reports_bands_in_corrected_mode_only():
    cxr, soft = _pair(64)
    mask = np.zeros(cxr.shape, bool)
    mask[10:50, 5:30] = True
    values, _, _ = M.score_pair(cxr, soft, cxr, "corrected", mask, None)
    for key in ("bsr_hp32", "bsr_hp64", "bsr_hp32_lung", "bsr_hp64_lung"):
        assert values[key] == pytest.approx(0.0)
    faithful, _, _ = M.score_pair(*(np.clip(a, 0, 1) for a in (cxr, soft, cxr)), "faithful")
    assert "bsr_hp32" not in faithful


def test_nodule_contrast():
    img = np.zeros((64, 64))
    rr, cc = np.ogrid[:64, :64]
    img[np.hypot(rr - 30, cc - 20) <= 5] = 0.4
    assert M.nodule_contrast(img, 30, 20, 5) == pytest.approx(0.4)
    assert M.nodule_contrast(img + 0.1, 30, 20, 5) == pytest.approx(0.4)       # tone does not change it
    assert math.isnan(M.nodule_contrast(img, 300, 20, 5))


# ------------------------------------------------------------------------------ tone curve

def test_tone_curve_fits_a_global_mapping_exactly():
    rng = np.random.default_rng(0)
    cxr = np.round(rng.random((40, 40)) * 255) / 255
    soft = 0.8 * cxr ** 1.5
    curve = fit_tone_curve([(cxr, soft)])
    assert curve.shape == (256,)
    assert np.allclose(apply_tone_curve(curve, cxr), soft, atol=1e-6)
    # levels no training pixel has are interpolated, and ends held
    sparse = fit_tone_curve([(np.array([[0.2, 0.6]]), np.array([[0.1, 0.5]]))])
    assert sparse[0] == pytest.approx(0.1) and sparse[-1] == pytest.approx(0.5)
    assert sparse[102] == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="no training pairs"):
        fit_tone_curve([])
    with pytest.raises(ValueError, match="size mismatch"):
        fit_tone_curve([(np.zeros((2, 2)), np.zeros((3, 3)))])


def test_tone_curve_cannot_remove_ribs_on_a_phantom():
    train = [generate_phantom(s, 128) for s in range(6)]
    curve = fit_tone_curve((p.cxr, p.bs) for p in train)
    test = generate_phantom(100, 128)
    pred = apply_tone_curve(curve, test.cxr)
    assert M.psnr(test.bs, pred) > M.psnr(test.bs, test.cxr) + 2       # it fixes the tone ...
    assert M.band_bsr(test.cxr, test.bs, pred, 64) < 0.3                # ... not the ribs


def test_tone_predictions_folder(tmp_path):
    from data.io import write_png

    names = []
    for i in range(3):
        p = generate_phantom(i, 64)
        write_png(tmp_path / "CXR" / f"c{i}.png", p.cxr)
        write_png(tmp_path / "BS" / f"c{i}.png", p.bs, bit_depth=16 if i == 2 else 8)
        names.append(f"c{i}.png")
    write_png(tmp_path / "CXR" / "c9.png", generate_phantom(9, 64).cxr, bit_depth=16)
    curve = fit_from_folders(tmp_path / "CXR", tmp_path / "BS", names)
    out = write_tone_predictions(curve, tmp_path / "CXR", ["c0.png", "c9.png"], tmp_path / "tone")
    assert read_image(out / "c0.png").bit_depth == 8 and read_image(out / "c9.png").bit_depth == 16
    assert len((out / "tone_curve.txt").read_text().split()) == 256
    with pytest.raises(FileNotFoundError, match="missing"):
        fit_from_folders(tmp_path / "CXR", tmp_path / "BS", ["c0.png", "nope.png"])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_tone_predictions(curve, tmp_path / "CXR", ["nope.png"], tmp_path / "tone2")
