"""Tests for data/phantom.py, the synthetic dataset used by the demo and the CPU tests.

What matters downstream: bit-exact determinism per seed, CXR-like content (two lungs, a rib
pattern in the bone image, lesions that survive bone suppression), anatomy that scales with the
resolution, and a written dataset that data.io reads back unchanged.
"""
import csv
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import label, regionprops

from data.io import read_image
from data.phantom import Phantom, _simulate, case_seed, generate_phantom, write_synthetic_dataset


@pytest.fixture(scope="module")
def cases256():
    """A few 256^2 phantoms shared by the content tests (generation is the slow part)."""
    return {seed: generate_phantom(seed, 256) for seed in range(4)}


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_same_seed_is_bit_identical():
    a, b = generate_phantom(7, 64), generate_phantom(7, 64)
    for field in ("cxr", "bs", "bone", "mask"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.nodules == b.nodules


def test_seeds_differ_in_anatomy_not_only_in_noise():
    cases = [generate_phantom(s, 64) for s in range(6)]
    for i in range(len(cases)):
        for j in range(i + 1, len(cases)):
            assert not np.array_equal(cases[i].cxr, cases[j].cxr)
            assert _iou(cases[i].mask, cases[j].mask) < 0.97  # lungs themselves move and change
    areas = [c.mask.mean() for c in cases]
    assert np.std(areas) > 0.004, areas
    means = [c.cxr.mean() for c in cases]
    assert np.ptp(means) > 0.02, means  # exposure / window vary too


@pytest.mark.parametrize("size", [64, 256])
def test_shapes_dtypes_and_ranges(size):
    ph = generate_phantom(1, size)
    assert isinstance(ph, Phantom)
    for img in (ph.cxr, ph.bs, ph.bone):
        assert img.shape == (size, size) and img.dtype == np.float32
        assert np.isfinite(img).all()
    for img in (ph.cxr, ph.bs):
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert img.max() - img.min() > 0.5  # uses the display range
    assert np.array_equal(ph.bone, ph.cxr - ph.bs)
    assert ph.mask.shape == (size, size) and ph.mask.dtype == bool
    for row, col, radius in ph.nodules:
        assert 0 <= row < size and 0 <= col < size and radius > 0
        assert ph.mask[int(round(row)), int(round(col))]


def test_size_too_small_is_rejected():
    with pytest.raises(ValueError, match="size"):
        generate_phantom(0, 8)


def test_display_like_real_pairs(cases256):
    """Air outside the body is (near) black, lungs darker than the mediastinum, and the soft-tissue
    target is darker than the CXR almost everywhere, as in the SZCH pairs (CXR - BS > 0 on 91 %)."""
    for ph in cases256.values():
        corner = ph.cxr[:8, :8]
        assert corner.mean() < 0.05
        assert ph.cxr[ph.mask].mean() < ph.cxr[~ph.mask].mean()
        assert (ph.bone > 0).mean() > 0.8
        assert (ph.cxr == 0).any() or (ph.bs == 0).any() or corner.min() < 0.02


def test_bone_image_has_ribs_inside_the_lungs(cases256):
    for ph in cases256.values():
        inside = ph.bone[ph.mask]
        assert np.abs(inside).mean() > 0.03
        assert inside.std() > 0.015  # not a constant offset: structure
        # Ribs cross a vertical line through each lung as a series of bright bands.
        for comp in regionprops(label(ph.mask)):
            col = int(comp.centroid[1])
            rows = np.flatnonzero(ph.mask[:, col])
            prof = np.median(ph.bone[rows[0]:rows[-1] + 1, col - 2:col + 3], axis=1)
            prof = np.convolve(prof, np.ones(3) / 3, mode="valid")
            peaks = 0
            for i in range(1, len(prof) - 1):
                if prof[i] > prof[i - 1] and prof[i] >= prof[i + 1]:
                    lo = prof[max(i - 10, 0):i + 11].min()
                    peaks += prof[i] - lo > 0.02
            assert peaks >= 4, (col, peaks)


def test_mask_is_two_separate_lungs(cases256):
    for ph in cases256.values():
        labels = label(ph.mask)
        comps = regionprops(labels)
        assert len(comps) == 2
        area = sorted(c.area / ph.mask.size for c in comps)
        assert 0.05 < area[0] and area[1] < 0.25, area
        cols = sorted(c.centroid[1] for c in comps)
        assert cols[0] < 128 < cols[1]  # one lung on each side of the midline


def test_nodules_are_soft_tissue_visible_in_cxr_and_bs():
    """A lesion appears in both images with nearly the same contrast, i.e. not in the bone image."""
    checked = 0
    for seed in range(6):
        with_ = _simulate(seed, 128)
        without = _simulate(seed, 128, lesions=False)
        assert without.nodules == with_.nodules  # same patient, same noise: only the lesions differ
        d_cxr, d_bs = with_.cxr - without.cxr, with_.bs - without.bs
        rr, cc = np.mgrid[:128, :128]
        far = np.ones((128, 128), bool)
        for row, col, radius in with_.nodules:
            dist = np.hypot(rr - row, cc - col)
            core = dist <= max(0.5 * radius, 1.0)
            far &= dist > 2 * radius
            assert d_cxr[core].mean() > 0.01 and d_bs[core].mean() > 0.01
            assert abs(d_cxr[core].mean() - d_bs[core].mean()) < 0.5 * d_bs[core].mean()
            checked += 1
        assert np.abs(d_cxr[far]).max() < 0.005 and np.abs(d_bs[far]).max() < 0.005
    assert checked >= 4


def test_anatomy_scales_with_size():
    small, large = generate_phantom(3, 64), generate_phantom(3, 256)
    pooled = large.mask.reshape(64, 4, 64, 4).mean(axis=(1, 3)) > 0.5
    assert _iou(small.mask, pooled) > 0.9
    assert len(small.nodules) == len(large.nodules)
    for (r0, c0, s0), (r1, c1, s1) in zip(small.nodules, large.nodules):
        assert abs((r0 + 0.5) * 4 - (r1 + 0.5)) < 1e-3 and abs((c0 + 0.5) * 4 - (c1 + 0.5)) < 1e-3
        assert abs(4 * s0 - s1) < 1e-3


def _read_tree(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def test_write_synthetic_dataset_round_trip(tmp_path):
    names = write_synthetic_dataset(tmp_path / "a", n=3, size=64, seed=5, progress=False)
    assert names == ["phantom_0000.png", "phantom_0001.png", "phantom_0002.png"]
    root = tmp_path / "a"
    for i, name in enumerate(names):
        ph = generate_phantom(case_seed(5, i), 64)
        cxr, bs = read_image(root / "CXR" / name), read_image(root / "BS" / name)
        bone, mask = read_image(root / "Bone" / name), read_image(root / "Mask" / name)
        assert cxr.bit_depth == 8 and cxr.size == (64, 64)
        assert np.abs(cxr.pixels - ph.cxr).max() <= 0.5 / 255 + 1e-6
        assert np.abs(bs.pixels - ph.bs).max() <= 0.5 / 255 + 1e-6
        assert bone.size == (64, 64) and bone.pixels.std() > 0.02
        assert set(np.unique(mask.pixels)) <= {0.0, 1.0}
        assert np.array_equal(mask.pixels > 0.5, ph.mask)
    with open(root / "nodules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["name"] in names for r in rows)
    assert rows and set(rows[0]) == {"name", "row", "col", "radius"}
    # Deterministic: a second run writes byte-identical files.
    write_synthetic_dataset(tmp_path / "b", n=3, size=64, seed=5, progress=False)
    assert _read_tree(root) == _read_tree(tmp_path / "b")


def test_write_synthetic_dataset_16_bit(tmp_path):
    write_synthetic_dataset(tmp_path, n=1, size=32, seed=1, bit_depth=16, progress=False)
    ph = generate_phantom(case_seed(1, 0), 32)
    img = read_image(tmp_path / "CXR" / "phantom_0000.png")
    assert img.bit_depth == 16
    assert np.abs(img.pixels - ph.cxr).max() <= 0.5 / 65535 + 1e-6
    assert read_image(tmp_path / "Mask" / "phantom_0000.png").bit_depth == 8


def bone_band_shares_real_and_phantom(szch: Path, n_phantoms: int = 16, size: int = 256):
    """Mean band shares (metrics.band_energies) of the bone image CXR - BS: the real SZCH pairs,
    area-resized to the demo's native size, and ``n_phantoms`` demo phantoms of that size."""
    from skimage.transform import resize

    import evaluation

    real = [resize(read_image(f).pixels.astype(np.float64) - read_image(szch / "BS" / f.name).pixels, (size, size),
                   anti_aliasing=True) for f in sorted((szch / "CXR").iterdir())]
    phantom = [generate_phantom(case_seed(0, i), size).bone for i in range(n_phantoms)]
    return evaluation.mean_band_energies(real), evaluation.mean_band_energies(phantom)


def test_bone_image_spectrum_matches_real_pairs(szch_samples):
    """How the bone image's energy splits between tone and structure, band by band (relative to
    the width), is within a factor 1.5 of the real pairs' mean in every band."""
    real, phantom = bone_band_shares_real_and_phantom(szch_samples)
    for band in real:
        ratio = phantom[band] / real[band]
        assert 1 / 1.5 <= ratio <= 1.5, f"band {band}: phantom {phantom[band]:.3f}, real {real[band]:.3f}"
    # more than a tenth of the bone energy is finer than sigma = W/64: structure, not tone
    assert phantom["W/64-W/128"] + phantom["fine"] > 0.15


def test_parallel_writing_gives_the_same_files(tmp_path):
    write_synthetic_dataset(tmp_path / "one", n=4, size=48, seed=3, progress=False, workers=1)
    write_synthetic_dataset(tmp_path / "two", n=4, size=48, seed=3, progress=False, workers=2)
    for sub in ("CXR", "BS", "Bone", "Mask"):
        for f in sorted((tmp_path / "one" / sub).iterdir()):
            assert f.read_bytes() == (tmp_path / "two" / sub / f.name).read_bytes(), f
    assert (tmp_path / "one" / "nodules.csv").read_text() == (tmp_path / "two" / "nodules.csv").read_text()
