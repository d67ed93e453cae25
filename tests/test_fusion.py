"""Global-local fusion (docs/method.md §5.3, §7.17-§7.19): the DST Poisson solver, seamless cloning against
dense transcriptions of OpenCV's algorithm and of Pérez's equations, mean matching, small-component
removal and the fuse() pipeline identities (local = global, offsets removed, outside pixels kept)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from data.masking import binarize_mask
from models.fusion import (erode, fuse, mean_match, poisson_blend, remove_small_components, scaled_min_component_px,
                           solve_poisson_dirichlet)


def lungs(h: int, w: int) -> np.ndarray:
    """Two elliptical "lungs" (bool)."""
    yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    left = ((xx - 0.3) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
    right = ((xx - 0.7) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1
    return left | right


def laplacian(u: np.ndarray) -> np.ndarray:
    """5-point Laplacian on the interior (zeros on the border)."""
    out = np.zeros_like(u)
    out[1:-1, 1:-1] = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    return out


def images(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth "global" image and a textured, brighter "local" one, both in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    dst = 0.5 + 0.2 * np.sin(7 * xx) * np.cos(5 * yy)
    src = np.clip(dst + 0.05 + 0.1 * xx + 0.05 * rng.standard_normal((h, w)), 0, 1)
    return src, dst


# --------------------------------------------------------------------------------------------------
# Dense references (independent transcriptions, only for small images)
# --------------------------------------------------------------------------------------------------

def naive_erode(m: np.ndarray, k: int) -> np.ndarray:
    h, w = m.shape
    p = np.pad(m, k, constant_values=True)
    return np.array([[p[i:i + 2 * k + 1, j:j + 2 * k + 1].all() for j in range(w)] for i in range(h)])


def dense_solve(unknown: np.ndarray, rhs: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Solve Δf = rhs at the ``unknown`` pixels, f = ``fixed`` elsewhere (dense linear algebra)."""
    idx = -np.ones(unknown.shape, int)
    idx[unknown] = np.arange(unknown.sum())
    n = unknown.sum()
    a, b = np.zeros((n, n)), np.zeros(n)
    for (i, j), k in zip(np.argwhere(unknown), idx[unknown]):
        a[k, k] = -4.0
        b[k] = rhs[i, j]
        for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            q = (i + di, j + dj)
            if unknown[q]:
                a[k, idx[q]] = 1.0
            else:
                b[k] -= fixed[q]
    out = fixed.astype(float).copy()
    out[unknown] = np.linalg.solve(a, b)
    return out


def opencv_reference(src, dst, mask):
    """seamlessClone(src, dst, mask, in place, NORMAL_CLONE) step by step, in float, on the ROI."""
    m = mask.copy()
    m[0], m[-1], m[:, 0], m[:, -1] = False, False, False, False
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    roi = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    patch = np.where(m, src, 0.0)[roi]                   # src copied under the mask, zeros elsewhere
    d_roi = dst[roi]
    m_e = naive_erode(m, 3)[roi]

    def grad(u, axis):                                   # forward difference, reflect-101 border
        p = np.pad(u, [(0, 1) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        return np.diff(p, axis=axis)

    def back(u, axis):                                   # backward difference, reflect-101 border
        p = np.pad(u, [(1, 0) if a == axis else (0, 0) for a in (0, 1)], mode="reflect")
        return np.diff(p, axis=axis)

    gx = m_e * grad(patch, 1) + (1 - m_e) * grad(d_roi, 1)
    gy = m_e * grad(patch, 0) + (1 - m_e) * grad(d_roi, 0)
    lap = back(gx, 1) + back(gy, 0)
    interior = np.zeros(d_roi.shape, bool)
    interior[1:-1, 1:-1] = True
    out = dst.copy()
    out[roi] = dense_solve(interior, lap, d_roi)
    return out


# --------------------------------------------------------------------------------------------------
# Solver and Poisson blending
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (13, 17), (32, 31)])
def test_dst_poisson_solver(shape):
    rhs = np.random.default_rng(0).standard_normal(shape)
    h = solve_poisson_dirichlet(rhs)
    assert np.abs(laplacian(np.pad(h, 1))[1:-1, 1:-1] - rhs).max() < 1e-10
    h32 = solve_poisson_dirichlet(rhs.astype(np.float32))
    assert h32.dtype == np.float32 and np.abs(h32 - h).max() < 1e-4 * max(1.0, np.abs(h).max())


def test_erode_is_three_3x3_erosions():
    m = np.random.default_rng(1).random((20, 23)) < 0.8
    m[5:15, 4:18] = True
    assert np.array_equal(erode(m, 3), naive_erode(m, 3))
    assert np.array_equal(erode(m, 0), m)


def test_bbox_blend_equals_opencv_algorithm():
    h, w = 24, 30
    src, dst = images(h, w)
    mask = lungs(h, w)
    mask[2, 3] = True                                    # an isolated pixel widens the box
    ours = poisson_blend(src, dst, mask, "bbox")
    ref = opencv_reference(src, dst, mask)
    assert np.abs(ours - ref).max() < 1e-10


def test_mask_blend_equals_perez_equations():
    """Dirichlet problem on the eroded mask Ω: Δf = Δsrc in Ω, f = dst outside."""
    h, w = 26, 30
    src, dst = images(h, w)
    mask = lungs(h, w)
    m = mask.copy()
    m[0], m[-1], m[:, 0], m[:, -1] = False, False, False, False
    omega = naive_erode(m, 3)
    ref = dense_solve(omega, laplacian(src - dst) + laplacian(dst), dst)
    ours = poisson_blend(src, dst, mask, "mask", tol=1e-12)
    assert np.abs(ours - ref).max() < 1e-9
    assert np.array_equal(ours[~omega], dst[~omega])


@pytest.mark.parametrize("domain", ["bbox", "mask"])
def test_constant_offset_inside_mask_gives_dst(domain):
    """src = dst + c inside the mask has dst's gradients wherever src is used: result = dst."""
    src, dst = images(40, 48)
    mask = lungs(40, 48)
    out = poisson_blend(np.where(mask, dst + 0.3, src), dst, mask, domain)
    assert np.abs(out - dst).max() < 1e-12


@pytest.mark.parametrize("domain", ["bbox", "mask"])
def test_texture_inside_mask_is_transferred(domain):
    """src = dst + c + bump inside the mask, bump supported well inside the eroded mask: the bump is
    the exact solution, so the result's gradients in the eroded mask are src's and the intensity
    level (c removed) is pinned to dst at the boundary."""
    h, w = 64, 96
    _, dst = images(h, w)
    mask = lungs(h, w)
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - 32, xx - 29)
    bump = np.where(r <= 8, 0.1 * np.exp(-r ** 2 / 8.0) * np.sin(xx), 0.0)   # compact support, left lung
    m_e = erode(mask, 3)
    assert erode(m_e, 1)[bump != 0].all()                 # support (dilated by 1 px) inside M_e
    src = np.where(mask, dst + 0.2 + bump, 0.0)          # zero outside the mask, as OpenCV's patch
    out = poisson_blend(src, dst, mask, domain, tol=1e-12)
    assert np.abs(out - (dst + bump)).max() < 1e-9
    gy, gx = np.gradient(out)
    sy, sx = np.gradient(src)
    inner = erode(m_e, 1)
    assert np.abs(gx - sx)[inner].max() < 1e-9 and np.abs(gy - sy)[inner].max() < 1e-9


def test_mask_domain_keeps_outside_exact_while_opencv_bbox_leaks():
    """OpenCV (bbox) changes pixels between the lungs (inside the box, outside the mask); the mask
    domain leaves every pixel outside the eroded mask untouched and satisfies Δf = Δsrc inside."""
    h, w = 64, 80
    src, dst = images(h, w, seed=3)
    mask = lungs(h, w)
    box = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    bbox_out = poisson_blend(src, dst, mask, "bbox")
    assert np.array_equal(bbox_out[~box], dst[~box])
    assert np.abs(bbox_out - dst)[box & ~mask].max() > 1e-3          # the leak (not a bug of ours)
    mask_out = poisson_blend(src, dst, mask, "mask", tol=1e-10)
    omega = erode(mask, 3)
    assert np.array_equal(mask_out[~omega], dst[~omega])
    assert np.abs(laplacian(mask_out) - laplacian(src))[omega].max() < 1e-8
    assert np.abs(mask_out - dst)[omega].max() > 1e-2                 # texture did come in


@pytest.mark.parametrize("domain", ["bbox", "mask"])
def test_blend_degenerate_masks(domain):
    src, dst = images(16, 16)
    empty = np.zeros((16, 16), bool)
    assert np.array_equal(poisson_blend(src, dst, empty, domain), dst)
    frame_only = ~np.pad(np.ones((14, 14), bool), 1)                 # cleared with the frame
    assert np.array_equal(poisson_blend(src, dst, frame_only, domain), dst)
    thin = np.zeros((16, 16), bool)
    thin[5:7, 2:14] = True                                           # erodes away completely
    assert np.array_equal(poisson_blend(src, dst, thin, domain), dst)
    with pytest.raises(ValueError, match="domain"):
        poisson_blend(src, dst, thin, "rect")
    with pytest.raises(ValueError, match="equal"):
        poisson_blend(src, dst[:8], thin, domain)


@pytest.mark.slow
def test_poisson_blend_1024_timing(capsys):
    """A full-size blend (1024², two lungs); the times are printed, not asserted."""
    src, dst = images(1024, 1024)
    mask = lungs(1024, 1024)
    times = {}
    for domain in ("bbox", "mask"):
        t0 = time.perf_counter()
        out = poisson_blend(src, dst, mask, domain)
        times[domain] = time.perf_counter() - t0
        assert np.isfinite(out).all()
        if domain == "mask":
            assert np.array_equal(out[~mask], dst[~mask])
    with capsys.disabled():
        print(f"\npoisson_blend 1024²: bbox {times['bbox']:.2f} s, mask {times['mask']:.2f} s")


# --------------------------------------------------------------------------------------------------
# Mask helpers and mean matching
# --------------------------------------------------------------------------------------------------

def test_remove_small_components_8_connected():
    m = np.zeros((100, 100), bool)
    m[2:4, 2:4] = True                                   # 4 px: removed
    m[10:19, 10:21] = True                               # 99 px: removed
    m[30:40, 30:40] = True                               # 100 px: kept (area < 100 is removed)
    idx = np.arange(50)
    chain = (idx + 45, 45 + idx % 2)                     # a zigzag touching only at corners
    m[chain] = True                                      # -> one 8-connected component of 50 px
    m[0, 99] = True
    out = remove_small_components(m, 100)
    assert not out[2:4, 2:4].any() and not out[10:19, 10:21].any() and not out[0, 99]
    assert out[30:40, 30:40].all() and out.sum() == 100
    assert remove_small_components(m, 50)[chain].all()   # 4-connectivity would see 50 single pixels
    assert np.array_equal(remove_small_components(m, 0), m)
    assert out.dtype == bool


def test_scaled_min_component_px():
    assert scaled_min_component_px(100, (1024, 1024)) == 100
    assert scaled_min_component_px(100, (1, 512, 512)) == 25
    assert scaled_min_component_px(100, (256, 256)) == 6
    assert scaled_min_component_px(100, (2048, 1024)) == 200


def test_binarize_mask():
    u8 = np.array([[0, 100, 128, 254, 255]], np.uint8)
    assert binarize_mask(u8).tolist() == [[False, False, True, True, True]]
    assert binarize_mask(u8, 1.0).tolist() == [[False, False, False, False, True]]   # reference: == 255
    assert binarize_mask(np.array([[0.2, 0.7]])).tolist() == [[False, True]]
    b = np.array([[True, False]])
    assert binarize_mask(b) is b
    with pytest.raises(ValueError):
        binarize_mask(np.zeros((2, 2, 3)))


def test_an_8_bit_mask_binarises_as_its_pixels_do():
    """fuse() takes 8-bit masks, the data pipeline [0, 1] pixels: both are lung above half scale; the
    reference's == 255 stays an option."""
    u8 = np.arange(256, dtype=np.uint8)[None]
    assert (binarize_mask(u8) == binarize_mask((u8 / 255.0).astype(np.float32))).all()
    assert (binarize_mask(u8) == (u8 >= 128)).all() and (binarize_mask(u8, 1.0) == (u8 == 255)).all()


def test_mean_match_removes_offset_inside_mask_only():
    rng = np.random.default_rng(0)
    g = rng.random((20, 20))
    mask = np.zeros((20, 20), bool)
    mask[5:15, 3:12] = True
    local = np.where(mask, g + 0.17, rng.random((20, 20)))
    out = mean_match(local, g, mask)
    assert np.abs(out[mask] - g[mask]).max() < 1e-12
    assert np.array_equal(out[~mask], local[~mask])
    assert np.array_equal(mean_match(local, g, np.zeros_like(mask)), local)


# --------------------------------------------------------------------------------------------------
# fuse()
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, domain", [("poisson", "mask"), ("poisson", "bbox"), ("alpha", "mask"),
                                          ("none", "mask")])
def test_fuse_local_equal_global_returns_global(mode, domain):
    _, g = images(64, 64)
    out = fuse(g, g.copy(), lungs(64, 64), mode=mode, poisson_domain=domain)
    assert out.dtype == np.float32 and np.array_equal(out, g.astype(np.float32))


@pytest.mark.parametrize("mode", ["poisson", "alpha"])
def test_fuse_constant_offset_is_removed(mode):
    _, g = images(64, 64)
    mask = lungs(64, 64)
    out = fuse(g, np.where(mask, g + 0.1, g), mask, mode=mode)
    assert np.abs(out - g).max() < 1e-6


@pytest.mark.parametrize("mode", ["poisson", "alpha"])
def test_fuse_pixels_outside_mask_are_global(mode):
    src, g = images(64, 64, seed=5)
    mask = lungs(64, 64)
    out = fuse(g, src, mask, mode=mode)
    assert np.array_equal(out[~mask], g.astype(np.float32)[~mask])
    assert np.abs(out - g)[mask].max() > 1e-2


def test_fuse_alpha_is_mask_weighted_mean_matched_local():
    src, g = images(64, 64, seed=5)
    mask = lungs(64, 64)
    out = fuse(g, src, mask, mode="alpha")
    expected = np.where(mask, mean_match(src, g, mask), g)
    np.testing.assert_allclose(out, np.clip(expected, 0, 1).astype(np.float32), atol=1e-7)


def test_fuse_clips_zeroes_background_and_drops_small_components():
    """§7.17: decodes outside [0, 1] are clipped first; §7.18: black CXR pixels (float test) are zeroed;
    lung components below the scaled 100-px threshold are not blended."""
    src, g = images(256, 256, seed=2)
    mask = lungs(256, 256)
    g_over = g.copy()
    g_over[:8] = 1.7                                      # overshooting decode, partly background
    cxr = np.full((256, 256), 0.4)
    cxr[:4] = 0.0                                         # black padding rows
    cxr[4:6] = 1 / 255                                    # darkest non-black value: not background
    speck = np.zeros_like(mask)
    speck[200:202, 20:22] = True                          # 4 px < scaled threshold 6 at 256²
    local = src.copy()
    local[195:207, 15:27] += 0.5
    out = fuse(g_over, local, mask | speck, cxr=cxr, mode="alpha")
    assert out.max() <= 1.0 and out.min() >= 0.0
    assert (out[:4] == 0).all() and (out[4:8] == 1).all()
    assert np.array_equal(out[speck], g.astype(np.float32)[speck])
    # uint8 CXR: 0 is black
    out8 = fuse(g_over, local, mask, cxr=np.where(cxr == 0, 0, 100).astype(np.uint8), mode="none")
    assert (out8[:4] == 0).all() and (out8[4:8] == 1).all()


def test_fuse_argument_checks():
    _, g = images(16, 16)
    mask = lungs(16, 16)
    with pytest.raises(ValueError, match="mode"):
        fuse(g, g, mask, mode="ae")
    with pytest.raises(ValueError, match="equal"):
        fuse(g, g[:8], mask)
    with pytest.raises(ValueError, match="cxr"):
        fuse(g, g, mask, cxr=g[:8])
