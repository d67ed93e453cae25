"""Global-local fusion in pixel space: mean matching and mask-guided Poisson blending (docs/method.md §5.3).

All functions work on NumPy arrays: images are float (H, W) in [0, 1], masks (H, W) bool.

:func:`poisson_blend` re-implements OpenCV's ``seamlessClone`` (NORMAL_CLONE; MONOCHROME_TRANSFER is
the same thing for gray images) without OpenCV, and :func:`fuse` is the reference pipeline of
``batch_lcm_eval.py`` with its bugs fixed (§7.17-§7.19).

What OpenCV 4.x does for ``seamlessClone(src, dst, mask, p, flags)`` with p = centre of the mask's
bounding box (the reference's choice, which places src exactly in place):

1. zero the mask's outer 1-px frame; R = bounding box of the remaining mask;
2. erode the mask 3x with a 3x3 kernel (= one 7x7 erosion) -> M_e;
3. guidance field G = M_e·∇src + (1 − M_e)·∇dst with forward differences ∇, on R;
4. solve Δf = div G (backward-difference divergence, so the 5-point Laplacian) on the interior of R
   with f = dst on R's outermost ring (Dirichlet), by a DST-I diagonalisation; write f into the
   whole of R, truncated to uint8. Outside R the result is dst.

With d = src − dst and h = f − dst this is Δh = div(M_e·∇d), h = 0 on the ring: the form solved here
(``domain="bbox"``), identical in exact arithmetic. Differences from OpenCV: we work in float64 on
[0, 1] floats, whereas OpenCV takes uint8 inputs (the reference truncated its floats with
``astype``), solves in float32 and *truncates* its result after clipping to [0, 255]; its output is
therefore ~1 gray level (0.004) below the float result on average (half from truncating dst, half
from truncating the result), at most ~2. And when the mask touches the image border, OpenCV's frame
clearing with the reference's centre point shifts the patch by 1 px; here the blend is always in place.

Note (checked against OpenCV's source): in ``bbox`` mode pixels *outside the mask but inside its
bounding box* change too. h is harmonic there, but not zero: it is pinned to 0 only on the box ring,
so the local image's gradients "leak" into the mediastinum between the lungs. ``domain="mask"``
solves Pérez et al.'s Dirichlet problem on M_e instead (h = 0 at every pixel outside M_e, guidance
Δd at every pixel inside), so pixels outside the eroded mask (including the 3-px rim inside the
mask that erosion removes) are exactly dst; it is solved by
conjugate gradients preconditioned with the same DST solver, one lung (4-connected component of M_e)
at a time on its bounding box (~20 iterations per lung at 1024²).
:func:`fuse` uses ``mask`` by default so that everything outside the lungs is the global image.
"""
from __future__ import annotations

import numpy as np
from skimage.measure import label, regionprops

from data.masking import binarize_mask

__all__ = ["FUSION_MODES", "POISSON_DOMAINS", "remove_small_components", "scaled_min_component_px",
           "mean_match", "erode", "solve_poisson_dirichlet", "poisson_blend", "fuse"]

FUSION_MODES = ("poisson", "alpha", "none")
POISSON_DOMAINS = ("mask", "bbox")


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------

def remove_small_components(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Drop the 8-connected components of ``mask`` with fewer than ``min_px`` pixels (§5.3 step 5).

    8-connectivity is OpenCV's ``connectedComponentsWithStats`` default, used by the reference.

    Args:
        mask: (H, W) bool (non-zero = in).
        min_px: components with area < min_px are removed; <= 1 removes nothing.

    Returns:
        (H, W) bool.
    """
    mask = np.asarray(mask) != 0
    if min_px <= 1 or not mask.any():
        return mask
    labels = label(mask, connectivity=2)
    areas = np.bincount(labels.ravel())
    keep = areas >= min_px
    keep[0] = False
    return keep[labels]


def scaled_min_component_px(min_px_at_1024: int, shape: tuple[int, ...]) -> int:
    """The reference's 100-px threshold (defined on 1024² images) scaled with the image area.

    round(min_px · H·W / 1024²): 100 at 1024², 25 at 512², 6 at 256².
    """
    h, w = shape[-2:]
    return int(round(min_px_at_1024 * h * w / 1024 ** 2))


def erode(mask: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Binary erosion with a 3x3 square, ``iterations`` times (= one (2k+1)² square erosion).

    Pixels beyond the image count as "in" (OpenCV's default erosion border), which does not matter
    after :func:`poisson_blend` has cleared the frame. Implemented as separable running minima.
    """
    out = np.asarray(mask, dtype=bool)
    k = int(iterations)
    if k <= 0:
        return out.copy()
    h, w = out.shape
    for axis, size in ((0, h), (1, w)):
        padded = np.pad(out, [(k, k) if a == axis else (0, 0) for a in (0, 1)], constant_values=True)
        acc = np.ones_like(out)
        for s in range(2 * k + 1):
            acc &= padded[s:s + size] if axis == 0 else padded[:, s:s + size]
        out = acc
    return out


# --------------------------------------------------------------------------------------------------
# Mean matching
# --------------------------------------------------------------------------------------------------

def mean_match(local: np.ndarray, global_: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift the local image inside the mask to the global image's mean there (§5.3 step 3).

    local[M] += mean(global[M]) − mean(local[M]); pixels outside M are unchanged. An empty mask
    returns a copy of ``local``.

    Args:
        local, global_: (H, W) float images.
        mask: (H, W) bool.

    Returns:
        (H, W) float64 copy of ``local``.
    """
    out = np.array(local, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if m.any():
        out[m] += np.mean(np.asarray(global_, dtype=np.float64)[m]) - np.mean(out[m])
    return out


# --------------------------------------------------------------------------------------------------
# Poisson solvers
# --------------------------------------------------------------------------------------------------

def _dst1_last(x: np.ndarray) -> np.ndarray:
    """DST-I along the last axis, X_k = Σ_{j=1..n} x_j sin(π j k / (n+1)), via a real FFT.

    Computed in x's dtype (float32 or float64; NumPy >= 2 transforms float32 natively).

    The odd extension e = [0, x, 0, −reverse(x)] of length 2(n+1) has FFT E_k = −2i·X_k.
    """
    n = x.shape[-1]
    ext = np.zeros(x.shape[:-1] + (2 * (n + 1),), dtype=x.dtype)
    ext[..., 1:n + 1] = x
    ext[..., n + 2:] = -x[..., ::-1]
    return np.fft.rfft(ext, axis=-1)[..., 1:n + 1].imag * -0.5


def _dst2(x: np.ndarray) -> np.ndarray:
    """2-D DST-I (both axes). Applied twice it gives (n+1)(m+1)/4 times the identity."""
    return _dst1_last(np.ascontiguousarray(_dst1_last(x).T)).T


def _laplacian_eigenvalues(shape: tuple[int, int], dtype=np.float64) -> np.ndarray:
    """Eigenvalues of the 5-point Laplacian with zero Dirichlet values around an (n, m) grid."""
    n, m = shape
    ky = 2.0 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)) - 2.0
    kx = 2.0 * np.cos(np.pi * np.arange(1, m + 1) / (m + 1)) - 2.0
    return (ky[:, None] + kx[None, :]).astype(dtype)


def solve_poisson_dirichlet(rhs: np.ndarray, eigenvalues: np.ndarray | None = None) -> np.ndarray:
    """Solve Δh = rhs on an (n, m) grid with h = 0 just outside it (fast Poisson solver).

    Δ is the 5-point Laplacian h[i−1,j] + h[i+1,j] + h[i,j−1] + h[i,j+1] − 4h[i,j]. The DST-I
    diagonalises it: h = S(S(rhs) / λ)·4/((n+1)(m+1)), λ_kl = 2cos(πk/(n+1)) + 2cos(πl/(m+1)) − 4
    (what OpenCV's ``Cloning::solve`` does). O(nm log nm).

    Args:
        rhs: (n, m) float array; float32 is solved in float32 (the CG preconditioner's choice,
            ~25 % faster), anything else in float64.
        eigenvalues: optional precomputed :func:`_laplacian_eigenvalues` (reused by the CG solver).
    """
    rhs = np.asarray(rhs)
    rhs = rhs if rhs.dtype == np.float32 else rhs.astype(np.float64)
    if rhs.size == 0:
        return rhs.copy()
    lam = _laplacian_eigenvalues(rhs.shape, rhs.dtype) if eigenvalues is None else eigenvalues
    n, m = rhs.shape
    return _dst2(_dst2(rhs) / lam) * (4.0 / ((n + 1) * (m + 1)))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # einsum, not np.vdot/np.linalg.norm: those call a multi-threaded BLAS, which on a busy 2-core
    # machine made the CG loop 2-3x slower than this single-threaded reduction.
    return float(np.einsum("ij,ij->", a, b))


def _norm(a: np.ndarray) -> float:
    return _dot(a, a) ** 0.5


def _masked_laplacian(x: np.ndarray, inside: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """5-point Laplacian of x (zero outside ``inside`` and outside the array), kept on ``inside``."""
    buf[1:-1, 1:-1] = x
    lap = buf[:-2, 1:-1] + buf[2:, 1:-1] + buf[1:-1, :-2] + buf[1:-1, 2:] - 4.0 * x
    return lap * inside


def _solve_masked_dirichlet(rhs: np.ndarray, inside: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """Solve Δh = rhs on the pixels ``inside`` with h = 0 everywhere else (Pérez's discrete problem).

    Conjugate gradients on the SPD system −Δ_Ω h = −rhs, preconditioned with the rectangle's fast
    Poisson solve restricted to Ω (P = R (−Δ_box)⁻¹ Rᵀ, symmetric positive definite). Stops when
    ‖residual‖ ≤ tol·‖rhs‖. The preconditioner runs in float32: it only has to be a good
    approximate inverse, and the iteration itself (residuals, updates) stays in float64.
    """
    shape = inside.shape
    if not np.any(rhs * inside):
        return np.zeros(shape)
    # The preconditioner's rectangle may be any rectangle containing Ω: pad it to sizes whose DST
    # (an FFT of length 2(n+1)) has only factors 2, 3, 5, which is 2-3x faster than awkward sizes.
    padded = tuple(_fft_friendly(k) for k in shape)
    inside_f = np.zeros(padded)
    inside_f[:shape[0], :shape[1]] = inside
    b = np.zeros(padded)
    b[:shape[0], :shape[1]] = -rhs * inside
    b_norm = _norm(b)
    x = np.zeros_like(b)
    lam = _laplacian_eigenvalues(b.shape, np.float32)
    buf = np.zeros((b.shape[0] + 2, b.shape[1] + 2))

    def precondition(r: np.ndarray) -> np.ndarray:
        return solve_poisson_dirichlet(r.astype(np.float32), lam).astype(np.float64) * -inside_f

    r = b.copy()
    z = precondition(r)
    p = z.copy()
    rz = _dot(r, z)
    for _ in range(max_iter):
        ap = -_masked_laplacian(p, inside_f, buf)
        step = rz / _dot(p, ap)
        x += step * p
        r -= step * ap
        if _norm(r) <= tol * b_norm:
            break
        z = precondition(r)
        rz_new = _dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x[:shape[0], :shape[1]]


def _fft_friendly(n: int) -> int:
    """Smallest k >= n such that k + 1 has no prime factor above 5."""
    k = n
    while True:
        v = k + 1
        for f in (2, 3, 5):
            while v % f == 0:
                v //= f
        if v == 1:
            return k
        k += 1


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (row0, row1, col0, col1) of the non-zero pixels, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def poisson_blend(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, domain: str = "bbox", *,
                  erode_iterations: int = 3, tol: float = 1e-4, max_iter: int = 500) -> np.ndarray:
    """Seamless cloning of ``src`` into ``dst`` in place (OpenCV ``seamlessClone`` equivalent, §5.3).

    See the module docstring for the algorithm and its relation to OpenCV. In both domains the
    guidance inside the eroded mask M_e is ∇src, so gradients (texture) come from src while the
    intensity level is pinned to dst at the boundary.

    Args:
        src: (H, W) float source (the mean-matched local image).
        dst: (H, W) float destination (the global image).
        mask: (H, W) bool (non-zero = in); its outer 1-px frame is ignored, as in OpenCV.
        domain: ``"bbox"`` (OpenCV: solve on the mask's bounding box, Dirichlet = dst on the box ring;
            pixels outside the mask but inside the box change as well) or ``"mask"`` (solve on M_e,
            Dirichlet = dst on every pixel outside M_e, which therefore equal dst exactly).
        erode_iterations: 3x3 erosions of the mask (OpenCV: 3).
        tol, max_iter: CG stopping rule for ``domain="mask"``: relative residual per lung; 1e-4
            gives errors ~1e-4 (0.04 gray levels of 255), ~20 iterations per lung at 1024².

    Returns:
        (H, W) float64 blended image; equals dst outside the mask's bounding box (both domains) and
        outside M_e (``mask`` domain). Not clipped.

    Raises:
        ValueError: shape mismatch or unknown domain.
    """
    if domain not in POISSON_DOMAINS:
        raise ValueError(f"domain must be one of {POISSON_DOMAINS}, got {domain!r}")
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    m = np.array(mask, dtype=bool)
    if not (src.shape == dst.shape == m.shape) or src.ndim != 2:
        raise ValueError(f"src {src.shape}, dst {dst.shape} and mask {m.shape} must be equal (H, W)")
    out = dst.copy()
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = False  # OpenCV clears the frame (one-pixel border)
    box = _bbox(m)
    if box is None:
        return out
    m_e = erode(m, erode_iterations)
    d = src - dst

    if domain == "bbox":
        r0, r1, c0, c1 = box
        if r1 - r0 < 2 or c1 - c0 < 2:  # no interior: OpenCV keeps the Dirichlet ring only
            return out
        dd, me = d[r0:r1 + 1, c0:c1 + 1], m_e[r0:r1 + 1, c0:c1 + 1]
        # Forward differences, masked at their *left/top* pixel like OpenCV's M_e·∇src; at the box's
        # last row/column M_e is 0 (eroded), so no padding convention is involved.
        gx = np.zeros_like(dd)
        gy = np.zeros_like(dd)
        gx[:, :-1] = (dd[:, 1:] - dd[:, :-1]) * me[:, :-1]
        gy[:-1, :] = (dd[1:, :] - dd[:-1, :]) * me[:-1, :]
        # Backward-difference divergence on the interior (the ring is Dirichlet).
        div = (gx[1:-1, 1:-1] - gx[1:-1, :-2]) + (gy[1:-1, 1:-1] - gy[:-2, 1:-1])
        if np.any(div):
            out[r0 + 1:r1, c0 + 1:c1] += solve_poisson_dirichlet(div)
        return out

    # Pérez's guidance v_pq = src_p − src_q on every edge of an inside pixel p gives the right-hand
    # side Δd at p; its 4 neighbours exist since M_e lies >= 1 px inside the frame-cleared image.
    lap_d = np.zeros_like(d)
    lap_d[1:-1, 1:-1] = d[:-2, 1:-1] + d[2:, 1:-1] + d[1:-1, :-2] + d[1:-1, 2:] - 4.0 * d[1:-1, 1:-1]
    # The 5-point stencil couples 4-neighbours only, so every 4-connected component of M_e (each
    # lung) is an independent problem; solving them on their own bounding boxes needs ~30 % fewer
    # CG iterations on ~half the area each than one solve on the union's box.
    labels = label(m_e, connectivity=1)
    for region in regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        inside = labels[r0:r1, c0:c1] == region.label
        out[r0:r1, c0:c1] += _solve_masked_dirichlet(lap_d[r0:r1, c0:c1] * inside, inside, tol, max_iter)
    return out


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------

def fuse(global_img: np.ndarray, local_img: np.ndarray, mask: np.ndarray, cxr: np.ndarray | None = None,
         mode: str = "poisson", min_component_px: int = 100, *, poisson_domain: str = "mask",
         mask_threshold: float | None = None, background_eps: float = 1e-6) -> np.ndarray:
    """Fuse the decoded global and local soft-tissue images (§5.3, with §7.17-§7.19 fixed).

    Steps:

    1. clip both decodes to [0, 1] (the reference did not, §7.17);
    2. background: zero the global image where the CXR is black (cxr <= ``background_eps``, tested on
       the float CXR; the reference's ``astype(np.int8)`` test, §7.18);
    3. mean-match the local image to the global one inside the lung mask, then zero its background
       and clip it to [0, 1] again (the reference clipped to [0, 255] before ``seamlessClone``);
    4. remove mask components smaller than ``min_component_px`` (a 1024² count, scaled with the
       image area by :func:`scaled_min_component_px`);
    5. ``poisson``: :func:`poisson_blend` (src = local, dst = global, in place);
       ``alpha``: M·l + (1 − M)·g with the cleaned binary mask M; ``none``: the global image of step 2.

    With ``poisson_domain="mask"`` (default) and with ``alpha`` every pixel outside the cleaned mask
    is exactly the global image of step 2; ``"bbox"`` is OpenCV's behaviour (see the module docstring).

    Args:
        global_img, local_img: (H, W) float decodes, nominally [0, 1] (0.5·D(z) + 0.5).
        mask: (H, W) lung mask (bool, 0-255 integers or [0, 1] floats; see :func:`data.masking.binarize_mask`).
        cxr: optional (H, W) input CXR in [0, 1] (floats; integer arrays: 0 is black) for the
            background step; None skips it.
        mode: one of :data:`FUSION_MODES`.
        min_component_px: minimum lung-component area at 1024² (reference: 100).
        poisson_domain: ``"mask"`` or ``"bbox"`` (see :func:`poisson_blend`).
        mask_threshold: see :func:`data.masking.binarize_mask` (None = the project's one binarisation, > half
            scale; 1.0 = the reference's "== 255").
        background_eps: CXR values <= this are background (8-bit 0 maps to exactly 0.0).

    Returns:
        (H, W) float32 in [0, 1].

    Raises:
        ValueError: unknown mode or mismatched shapes.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    g = np.clip(np.asarray(global_img, dtype=np.float64), 0.0, 1.0)
    l = np.clip(np.asarray(local_img, dtype=np.float64), 0.0, 1.0)  # noqa: E741
    m = binarize_mask(mask, mask_threshold)
    if not (g.shape == l.shape == m.shape) or g.ndim != 2:
        raise ValueError(f"global {g.shape}, local {l.shape} and mask {m.shape} must be equal (H, W)")
    background = None
    if cxr is not None:
        cxr = np.asarray(cxr)
        if cxr.shape != g.shape:
            raise ValueError(f"cxr has shape {cxr.shape}, images {g.shape}")
        background = cxr == 0 if np.issubdtype(cxr.dtype, np.integer) else cxr <= background_eps
        g[background] = 0.0
    if mode == "none":
        return g.astype(np.float32)

    l = mean_match(l, g, m)  # noqa: E741
    if background is not None:
        l[background] = 0.0
    l = np.clip(l, 0.0, 1.0)  # noqa: E741
    m = remove_small_components(m, scaled_min_component_px(min_component_px, m.shape))

    if mode == "alpha":
        fused = np.where(m, l, g)
    else:
        fused = poisson_blend(l, g, m, poisson_domain)
    return np.clip(fused, 0.0, 1.0).astype(np.float32)
