"""Paired radiographs from a chest CT: digitally reconstructed radiographs (DRR) with and without bone.

A radiograph is a projection of X-ray attenuation: a detector pixel records I = I0 exp(-L) with
L = ∫ mu(p) ds along the ray from the source to that pixel (Beer–Lambert). Projecting a CT volume
once as it is and once with its bone voxels replaced by soft tissue gives a CXR and a soft-tissue
image of the same, real anatomy that are registered exactly: the difference of the two line
integrals is the line integral of the removed bone (dual-energy subtraction removes the calcium the
same way). This module builds such pairs:

* :func:`hu_to_mu` maps Hounsfield units to linear attenuation at an effective energy;
* :func:`remove_bone` replaces labelled bone (grown by a voxel) by soft tissue where it is denser;
* :func:`project` integrates a (C, D, H, W) stack of volumes along the rays of a :class:`View`, in
  parallel or cone-beam geometry, slice by slice with bilinear sampling (Joseph's method on
  ``torch.nn.functional.grid_sample``), so it runs batched on the CPU or a GPU;
* :func:`radiograph_pair` applies one radiograph chain (quantum noise, detector blur, equalisation,
  unsharp masking, window) identically to both line-integral images: every step before the window is
  linear and shared, so CXR − BS is the processed bone layer.

Coordinates: world positions are in mm in the NIfTI RAS+ frame (+x towards the patient's right,
+y anterior, +z superior). The reference posterior-anterior (PA) view shoots along +y (posterior to
anterior); image columns run towards the patient's left (-x), so the patient's right lung is on the
image left as on a film on a light box, and rows run from head to feet (-z). Loading (NIfTI, DICOM),
label tables and the dataset writer live in :mod:`data.ct`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

MU_WATER_PER_MM = 0.0206   # water at ~60 keV, the effective energy of a ~120 kVp chest beam (NIST XCOM: 0.206 /cm)
SOFT_TISSUE_HU = 40.0      # what bone becomes in the soft-tissue volume (muscle / blood)
AIR_HU = -1000.0


# ----------------------------------------------------------------------------- attenuation

def hu_to_mu(hu: torch.Tensor, mu_water: float = MU_WATER_PER_MM, dense_gain: float = 1.0) -> torch.Tensor:
    """Hounsfield units -> linear attenuation in 1/mm at the effective energy (mu >= 0).

    HU = 1000 (mu - mu_water) / mu_water by definition, so mu = mu_water (1 + HU / 1000); values
    below air (the -2048 or -3024 padding of many scanners) clip to zero attenuation. Above soft
    tissue (SOFT_TISSUE_HU) the excess is scaled by ``dense_gain``: calcium (and iodine) attenuate
    relatively more at a radiograph's lower effective energy than at the CT's, and a CT's thin
    cortices lose contrast to partial volume; 1 is the plain linear map.
    """
    excess = (hu - SOFT_TISSUE_HU).clamp_min(0.0)
    return (mu_water * (1.0 + (hu + (dense_gain - 1.0) * excess) / 1000.0)).clamp_min(0.0)


def remove_bone(hu: torch.Tensor, bone: torch.Tensor, grow: int = 1,
                soft_hu: float = SOFT_TISSUE_HU) -> torch.Tensor:
    """The soft-tissue volume: voxels of ``bone`` (grown by ``grow`` voxels) denser than soft tissue
    are set to ``soft_hu``; everything else, marrow and fat included, is kept.

    Args:
        hu: (D, H, W) float CT in HU. bone: (D, H, W) bool mask. grow: dilation in voxels (a
            3×3×3 cube per step) that takes in the partial-volume rim a segmentation leaves out.
    Returns:
        (D, H, W) float, a new tensor (``hu`` is not modified).
    """
    if bone.shape != hu.shape:
        raise ValueError(f"bone mask shape {tuple(bone.shape)} differs from the CT's {tuple(hu.shape)}")
    mask = grow_mask(bone, grow)
    return torch.where(mask & (hu > soft_hu), torch.full_like(hu, soft_hu), hu)


def grow_mask(mask: torch.Tensor, grow: int = 1) -> torch.Tensor:
    """(D, H, W) bool mask dilated by ``grow`` voxels (3×3×3 cube per step)."""
    m = mask.to(torch.float32)[None, None]
    for _ in range(grow):
        m = F.max_pool3d(m, 3, stride=1, padding=1)
    return m[0, 0] > 0


# ----------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class View:
    """One projection geometry. Angles in degrees, lengths in mm.

    Attributes:
        size: detector pixels (size × size).
        pixel_mm: pixel pitch at the isocentre (the field of view is size * pixel_mm).
        rotation: about the body axis (z), positive turns the patient's left towards the detector
            (an oblique view). tilt: about the left-right axis (x), positive tips the head towards
            the detector (lordotic).
        shift: (right, down) offset of the field in mm, in image axes.
        flip: mirror the image left-right (the geometry is unchanged; applied by the callers).
        cone: False = parallel rays; True = a point source at ``sid`` mm from the detector, the
            isocentre (the volume's centre) at ``sod`` mm from the source (magnification sid/sod).
        supersample: rays per pixel along each axis (k × k rays averaged; anti-aliasing).
    """
    size: int = 256
    pixel_mm: float = 1.4
    rotation: float = 0.0
    tilt: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    flip: bool = False
    cone: bool = False
    sid: float = 1800.0
    sod: float = 1650.0
    supersample: int = 1

    def __post_init__(self):
        for key in ("size", "supersample"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"View.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("pixel_mm", "sid", "sod"):
            v = float(getattr(self, key))
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"View.{key} must be a positive finite number, got {v}")
        if self.cone and self.sod >= self.sid:
            raise ValueError(f"View.sod ({self.sod}) must be below View.sid ({self.sid}) for a cone beam")


def _rot(axis: str, deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "z":
        return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)


def view_axes(view: View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit vectors (float64, world frame) of the beam direction d and the image column / row axes.

    PA reference: d = +y (posterior -> anterior), columns -x (to the patient's left), rows -z (down).
    Rotation about z, then tilt about x, turn all three together (a rigid turn of the patient).
    """
    r = _rot("x", view.tilt) @ _rot("z", view.rotation)
    d, u, v = (r @ torch.tensor(a, dtype=torch.float64) for a in ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)))
    return d, u, v


def rays(view: View, center: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A point and the unit direction of every detector ray of ``view``.

    Args:
        center: (3,) world point at the centre of the field (the isocentre).
    Returns:
        points (N, 3), directions (N, 3) float64 with N = (size·k)², k = ``view.supersample``, in
        row-major detector order; each point is where its ray crosses the plane through the
        isocentre normal to the central ray.
    """
    d, u, v = view_axes(view)
    n = view.size * view.supersample
    pitch = view.pixel_mm / view.supersample
    idx = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * pitch
    rows, cols = torch.meshgrid(idx + view.shift[1], idx + view.shift[0], indexing="ij")
    plane = center + cols.reshape(-1, 1) * u + rows.reshape(-1, 1) * v
    if not view.cone:
        return plane, d.expand(n * n, 3)
    direction = plane - (center - view.sod * d)       # from the source through each point
    return plane, direction / direction.norm(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- projection

@dataclass
class Volume:
    """Attenuation volumes on one voxel grid.

    Attributes:
        data: (C, D, H, W) float32; channel c is one volume (e.g. mu, mu without bone, lung
            indicator); index order (D, H, W) = (k, j, i) of the NIfTI voxel grid.
        affine: (4, 4) float64 voxel (i, j, k, 1) -> world mm (RAS+), as nibabel gives it.
    """
    data: torch.Tensor
    affine: np.ndarray

    @property
    def center(self) -> torch.Tensor:
        """World position (3,) float64 of the grid's centre."""
        k, j, i = ((s - 1) / 2 for s in self.data.shape[1:])
        return torch.from_numpy(self.affine[:3] @ np.array([i, j, k, 1.0]))


def project(volume: Volume, view: View, chunk: int = 1 << 22) -> torch.Tensor:
    """Line integrals of every channel of ``volume`` along the rays of ``view`` (Joseph's method).

    The voxel axis most aligned with the beam is the slicing axis; each ray is sampled once per slice
    of that axis, at its intersection with the slice, by bilinear interpolation within the slice,
    and each sample is weighted by the ray's length per slice (mm). This is the standard projector
    of iterative CT reconstruction: linear in the volume (so the bone layer stays exact), one 2-D
    lookup per voxel slice crossed, and no samples in the empty space before or after the grid.
    Samples that fall outside a slice are zero (air). Rays are processed in chunks of about ``chunk``
    samples so that memory stays bounded at any size.

    Returns:
        (C, size, size) float32 on the volume's device: ∫ channel ds in channel-units·mm (for mu in
        1/mm this is the dimensionless L of I = I0 exp(-L)). ``view.flip`` is not applied here.
    """
    origins, direction = rays(view, volume.center)
    inv = torch.from_numpy(np.linalg.inv(volume.affine))
    o = origins @ inv[:3, :3].T + inv[:3, 3]          # (N, 3) voxel (i, j, k) coordinates
    r = direction @ inv[:3, :3].T                     # voxel steps per mm along each ray
    axes = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    a = int(np.argmax(np.abs(axes.T @ direction[direction.shape[0] // 2].numpy())))   # slicing axis (i, j or k)
    b, c = [x for x in (0, 1, 2) if x != a]
    ra = r[:, a]
    if bool((ra.abs() < 1e-9).any()):
        raise ValueError("a ray runs parallel to the slicing axis' slices; use a view within 45° of a volume axis")
    # (C, D, H, W) is indexed (k, j, i): slices along voxel axis a, in-slice axes (x = b, y = c) in
    # grid_sample order (x indexes the last dimension)
    dims = {0: 3, 1: 2, 2: 1}                          # voxel axis -> tensor dim of data
    planes = volume.data.permute(dims[a], 0, *sorted((dims[b], dims[c]))).contiguous()   # (Na, C, Y, X)
    x_axis, y_axis = (b, c) if dims[b] > dims[c] else (c, b)
    n_a, C, ny, nx = planes.shape
    dev = volume.data.device
    # In-slice coordinates are affine in the slice index J: g = g(J = 0) + J * dg/dJ, per ray, computed
    # in float64 and normalised to grid_sample's [-1, 1] (align_corners=True) before going to float32.
    t0 = -o[:, a] / ra                                                   # ray parameter at slice 0
    start, slope = [], []
    for ax, n in ((x_axis, nx), (y_axis, ny)):
        scale = 2.0 / max(n - 1, 1)
        start.append((o[:, ax] + t0 * r[:, ax]) * scale - 1.0)
        slope.append(r[:, ax] / ra * scale)
    start = torch.stack(start, dim=-1).to(device=dev, dtype=torch.float32)   # (N, 2)
    slope = torch.stack(slope, dim=-1).to(device=dev, dtype=torch.float32)
    weight = (1.0 / ra.abs()).to(device=dev, dtype=torch.float32)           # mm of ray per slice
    slices = torch.arange(n_a, dtype=torch.float32, device=dev)[:, None, None]
    n_rays = o.shape[0]
    per = max(1, chunk // n_a)
    out = torch.empty(C, n_rays, dtype=torch.float32, device=dev)
    for lo in range(0, n_rays, per):
        hi = min(lo + per, n_rays)
        grid = torch.addcmul(start[None, lo:hi], slices, slope[None, lo:hi])  # (Na, R, 2)
        samples = F.grid_sample(planes, grid[:, :, None], mode="bilinear", padding_mode="zeros",
                                align_corners=True)                           # (Na, C, R, 1)
        out[:, lo:hi] = samples[..., 0].sum(dim=0) * weight[lo:hi]
    n = view.size * view.supersample
    out = out.reshape(-1, n, n)
    if view.supersample > 1:
        out = F.avg_pool2d(out[None], view.supersample)[0]
    return out


def project_point(point: torch.Tensor | np.ndarray, center: torch.Tensor, view: View) -> tuple[float, float, float]:
    """Where a world point lands on the detector of ``view``: (row, col) in pixels (before
    ``view.flip``) and the magnification at that point relative to the isocentre plane."""
    d, u, v = view_axes(view)
    rel = torch.as_tensor(np.asarray(point, dtype=np.float64)) - center
    mag = 1.0
    if view.cone:
        depth = view.sod + float(rel @ d)          # distance from the source along the central ray
        mag = view.sod / depth
    x = float(rel @ u) * mag - view.shift[0]
    y = float(rel @ v) * mag - view.shift[1]
    half = (view.size - 1) / 2
    return y / view.pixel_mm + half, x / view.pixel_mm + half, mag


# ----------------------------------------------------------------------------- radiograph chain

@dataclass(frozen=True)
class Processing:
    """The radiograph chain after the line integrals; one instance is applied to both images of a pair.

    Attributes:
        dose: photons per pixel reaching an unattenuated detector element (None: no quantum noise).
            The noise field is drawn once, from the CXR's counts, and added to both log images.
        blur_px: detector blur (Gaussian sigma, pixels).
        equalize: strength a of the dynamic-range compression L - a (G_sigma * L), sigma = ``equalize_sigma``
            times the width: the mediastinum and the lungs come closer in grey, as in every clinical film.
        unsharp: gain b of the unsharp masking L + b (L - G_s * L), s = ``unsharp_sigma`` times the width.
        window: (low, high) percentiles of the processed CXR inside the body that map to 0 and 1.
    """
    dose: float | None = None
    blur_px: float = 0.6
    equalize: float = 0.7
    equalize_sigma: float = 1 / 8
    unsharp: float = 1.0
    unsharp_sigma: float = 1 / 64
    window: tuple[float, float] = (0.5, 99.8)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) with reflect padding (a linear operator; sigma in pixels)."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x[:, None], (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1))[:, 0]


def linear_chain(L: torch.Tensor, proc: Processing) -> torch.Tensor:
    """The linear part of the chain (blur, equalisation, unsharp masking) on (N, H, W) log images.

    Linear, so chain(L_cxr) - chain(L_soft) = chain(L_cxr - L_soft): the bone layer survives exactly.
    """
    w = L.shape[-1]
    x = gaussian_blur(L, proc.blur_px)
    if proc.equalize:
        x = x - proc.equalize * gaussian_blur(x, proc.equalize_sigma * w)
    if proc.unsharp:
        x = x + proc.unsharp * (x - gaussian_blur(x, proc.unsharp_sigma * w))
    return x


def radiograph_pair(L_cxr: torch.Tensor, L_soft: torch.Tensor, proc: Processing, body: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Display images of a pair from their line integrals, with one chain and one window.

    Args:
        L_cxr, L_soft: (H, W) line integrals of the CT and of its bone-free volume.
        body: (H, W) bool, where the window percentiles are taken (default: L_cxr > 0.1).
        generator: draws the quantum noise (needed when ``proc.dose`` is set).
    Returns:
        cxr, bs: (H, W) float32 in [0, 1], bones and dense tissue bright, air dark.
    """
    L = torch.stack([L_cxr, L_soft]).to(torch.float32)
    if proc.dose:
        # Poisson counts N0 exp(-L) have a log whose std is 1 / sqrt(counts); one field for both images
        counts = proc.dose * torch.exp(-L[0]).clamp_min(1e-12)
        noise = torch.randn(L.shape[1:], generator=generator, dtype=torch.float32) / counts.sqrt()
        L = L + noise.to(L.device)
    x = linear_chain(L, proc)
    body = (L_cxr > 0.1) if body is None else body
    vals = x[0][body.to(x.device)] if body.any() else x[0].flatten()
    lo, hi = (torch.quantile(vals.float()[:: max(1, vals.numel() // 200_000)], q / 100.0) for q in proc.window)
    scale = 1.0 / max(float(hi - lo), 1e-6)
    out = ((x - lo) * scale).clamp(0.0, 1.0)
    return out[0], out[1]


def jitter(view: View, rng: np.random.Generator, rotation: tuple[float, float], tilt: tuple[float, float],
           zoom: tuple[float, float] = (1.0, 1.0), shift_mm: float = 0.0, flip_p: float = 0.0) -> View:
    """A random view around ``view``: rotation and tilt drawn uniformly from their (lo, hi) ranges,
    pixel pitch scaled by 1 / zoom, shift uniform in ±shift_mm per axis, flip with probability flip_p."""
    return replace(view, rotation=float(rng.uniform(*rotation)), tilt=float(rng.uniform(*tilt)),
                   pixel_mm=view.pixel_mm / float(rng.uniform(*zoom)),
                   shift=(float(rng.uniform(-shift_mm, shift_mm)), float(rng.uniform(-shift_mm, shift_mm))),
                   flip=bool(rng.random() < flip_p))
