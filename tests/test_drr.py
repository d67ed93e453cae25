"""The CT projector (data/drr.py): line integrals of analytic volumes, view geometry, exact
additivity of the bone layer through the radiograph chain, bone removal.

Every volume here is synthetic and small (at most ~80 voxels a side), so the file runs in seconds.
Analytic objects are voxelised with a one-voxel linear partial-volume ramp at their surface, so
that trilinear sampling reproduces the exact chord lengths to well under a percent away from the rim.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.drr import (MU_WATER_PER_MM, SOFT_TISSUE_HU, Processing, View, Volume, grow_mask, hu_to_mu,
                      linear_chain, project, project_point, radiograph_pair, remove_bone, view_axes)

MU = 0.02          # 1/mm, about water
ORIGIN = torch.zeros(3, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ helpers

def centred_affine(shape_dhw, spacing=1.0) -> np.ndarray:
    """Voxel (i, j, k) -> world mm with the grid's centre at the world origin."""
    d, h, w = shape_dhw
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = [-spacing * (w - 1) / 2, -spacing * (h - 1) / 2, -spacing * (d - 1) / 2]
    return a


def world_coords(shape_dhw, spacing=1.0):
    """(x, y, z) world coordinates, each (D, H, W) float64, of the voxel centres of a centred grid."""
    d, h, w = shape_dhw
    k, j, i = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (d, h, w)), indexing="ij")
    return spacing * (i - (w - 1) / 2), spacing * (j - (h - 1) / 2), spacing * (k - (d - 1) / 2)


def ramp(signed_depth: torch.Tensor, spacing=1.0) -> torch.Tensor:
    """Partial-volume occupancy from the signed distance inside a surface (mm): 1 deep inside, 0 outside,
    linear across one voxel at the surface."""
    return (signed_depth / spacing + 0.5).clamp(0.0, 1.0)


def sphere_volume(shape_dhw, radius, center=(0.0, 0.0, 0.0), mu=MU, spacing=1.0) -> Volume:
    x, y, z = world_coords(shape_dhw, spacing)
    r = ((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2).sqrt()
    data = (mu * ramp(radius - r, spacing)).to(torch.float32)[None]
    return Volume(data, centred_affine(shape_dhw, spacing))


def cylinder_volume(shape_dhw, radius, mu=MU, spacing=1.0) -> Volume:
    """An infinite cylinder along z (the body axis) through the origin, cut by the grid."""
    x, y, _ = world_coords(shape_dhw, spacing)
    data = (mu * ramp(radius - (x ** 2 + y ** 2).sqrt(), spacing)).to(torch.float32)[None]
    return Volume(data, centred_affine(shape_dhw, spacing))


def chord(r: float, dist: np.ndarray) -> np.ndarray:
    """Length of a line's chord through a sphere (or circle) of radius r at distance ``dist`` from its centre."""
    return 2.0 * np.sqrt(np.clip(r * r - np.asarray(dist) ** 2, 0.0, None))


def pixel_offsets(view: View) -> np.ndarray:
    """Offsets (mm) of the pixel centres from the field's centre along a row or column of ``view``."""
    return (np.arange(view.size) - (view.size - 1) / 2) * view.pixel_mm


def peak_position(image: torch.Tensor, level: float = 0.5) -> tuple[float, float]:
    """Intensity-weighted (row, col) centroid of the pixels above ``level`` times the maximum."""
    img = image.double()
    w = torch.where(img > level * img.max(), img, torch.zeros_like(img))
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in img.shape), indexing="ij")
    return float((w * rows).sum() / w.sum()), float((w * cols).sum() / w.sum())


# ------------------------------------------------------------------------------------------ attenuation

def test_hu_to_mu_definition_and_dense_gain():
    hu = torch.tensor([-3024.0, -1000.0, 0.0, SOFT_TISSUE_HU, 1000.0])
    mu = hu_to_mu(hu)
    # mu = mu_water (1 + HU / 1000); padding below air clips to 0
    assert torch.allclose(mu, torch.tensor([0.0, 0.0, 1.0, 1.04, 2.0]) * MU_WATER_PER_MM, atol=1e-7)
    boosted = hu_to_mu(hu, dense_gain=2.0)
    assert torch.equal(boosted[:4], mu[:4])              # up to soft tissue the map is unchanged
    expected = MU_WATER_PER_MM * (1 + (1000 + (1000 - SOFT_TISSUE_HU)) / 1000)
    assert float(boosted[4]) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------ line integrals

def test_sphere_parallel_chords():
    """Uniform sphere, parallel rays: L(d) = 2 mu sqrt(r^2 - d^2) at distance d from the centre."""
    r = 18.0
    vol = sphere_volume((56, 56, 56), r)
    view = View(size=61, pixel_mm=1.0)
    L = project(vol, view)[0].double().numpy()
    c = (view.size - 1) // 2
    assert L.shape == (61, 61)
    assert L[c, c] == pytest.approx(2 * r * MU, rel=0.01)
    d = pixel_offsets(view)
    for profile, factor in ((L[c, :], 1.0), (L[:, c], 1.0), (np.diag(L), math.sqrt(2))):
        dist = np.abs(d) * factor
        keep = dist <= 0.85 * r                            # away from the rim, where the ramp blurs the edge
        np.testing.assert_allclose(profile[keep], MU * chord(r, dist[keep]), rtol=0.02)
    # outside the sphere (plus the ramp's half voxel) the rays cross only air
    x = np.abs(d)[None, :] ** 2 + np.abs(d)[:, None] ** 2
    assert np.abs(L[x > (r + 2.0) ** 2]).max() < 1e-6    # the ramp and the interpolation reach 1.5 mm out
    # the total is the sphere's mass: integral of L over the detector = mu * volume (4/3 pi r^3)
    assert L.sum() * view.pixel_mm ** 2 == pytest.approx(MU * 4 / 3 * math.pi * r ** 3, rel=0.01)


@pytest.mark.parametrize("rotation", [0.0, 30.0, -75.0])
def test_cylinder_parallel_chords_and_rotation_invariance(rotation):
    """A cylinder along the body axis: every row of the image is 2 mu sqrt(r^2 - x^2), whatever the
    rotation about that axis (the rotation axis is the cylinder's)."""
    r = 15.0
    vol = cylinder_volume((40, 48, 48), r)
    view = View(size=41, pixel_mm=1.0, rotation=rotation)
    L = project(vol, view)[0].double().numpy()
    d = pixel_offsets(view)
    exp = MU * chord(r, np.abs(d))
    keep = np.abs(d) <= 0.85 * r
    for row in (5, 20, 35):                      # rows within the grid's z extent (±19.5 mm)
        np.testing.assert_allclose(L[row, keep], exp[keep], rtol=0.02)
    assert L[20, np.abs(d) > r + 1].max() < 1e-6


def test_cylinder_tilt_lengthens_chords():
    """Tilted by t about the left-right axis, rays cross the z-cylinder obliquely: chord / cos t."""
    r, tilt = 15.0, 25.0
    vol = cylinder_volume((60, 48, 48), r)
    view = View(size=41, pixel_mm=1.0, tilt=tilt)
    L = project(vol, view)[0].double().numpy()
    d = pixel_offsets(view)
    exp = MU * chord(r, np.abs(d)) / math.cos(math.radians(tilt))
    keep = np.abs(d) <= 0.85 * r
    np.testing.assert_allclose(L[20, keep], exp[keep], rtol=0.02)


def cone_expected(view: View, center, r: float, mu: float = MU) -> np.ndarray:
    """Exact line integrals through a sphere for the cone beam of ``view`` (rotation = tilt = 0), from the
    documented geometry: PA beam along +y with the source at y = -sod, detector columns along -x, rows
    along -z, pixel centres placed on the isocentre plane y = 0."""
    off = pixel_offsets(view)
    rows, cols = np.meshgrid(off, off, indexing="ij")
    plane = np.stack([-cols, np.zeros_like(cols), -rows], axis=-1)      # (n, n, 3)
    source = np.array([0.0, -view.sod, 0.0])
    direction = plane - source
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    rel = np.asarray(center, dtype=np.float64) - source
    dist = np.linalg.norm(np.cross(rel, direction), axis=-1)
    return mu * chord(r, dist)


def test_sphere_cone_chords_with_magnification():
    """Cone beam (source 150 mm before the isocentre): a sphere 25 mm nearer the source than the isocentre
    is magnified 150/125 = 1.2 and each pixel holds the chord along its own ray from the source."""
    r, center = 10.0, (0.0, -25.0, 0.0)
    vol = sphere_volume((40, 80, 48), r, center=center)
    view = View(size=51, pixel_mm=0.8, cone=True, sid=300.0, sod=150.0)
    L = project(vol, view)[0].double().numpy()
    exp = cone_expected(view, center, r)
    c = (view.size - 1) // 2
    assert L[c, c] == pytest.approx(2 * r * MU, rel=0.01)
    inner = exp > 0.7 * exp.max()                    # chords away from the rim (|d| < ~0.7 r)
    np.testing.assert_allclose(L[inner], exp[inner], rtol=0.02)
    assert np.abs(L[cone_expected(view, center, r + 2.0) == 0]).max() < 1e-6   # rays that miss the sphere
    # magnification: the shadow's width is 2 r * 1.2 (vs 2 r for parallel rays)
    width_mm = (L[c] > 0.5 * MU).sum() * view.pixel_mm
    parallel = project(vol, View(size=51, pixel_mm=0.8))[0].double().numpy()
    width_par = (parallel[c] > 0.5 * MU).sum() * view.pixel_mm
    assert width_mm / width_par == pytest.approx(1.2, abs=0.08)
    _, _, mag = project_point(center, vol.center, view)
    assert mag == pytest.approx(150.0 / 125.0)


# ------------------------------------------------------------------------------------------ geometry

def test_view_axes_reference_and_orthonormal():
    d, u, v = view_axes(View())
    assert d.tolist() == [0.0, 1.0, 0.0] and u.tolist() == [-1.0, 0.0, 0.0] and v.tolist() == [0.0, 0.0, -1.0]
    d, u, v = view_axes(View(rotation=17.0, tilt=-9.0))
    m = torch.stack([d, u, v])
    assert torch.allclose(m @ m.T, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_off_centre_sphere_lands_where_the_docstrings_say():
    """PA reference: the patient's left (-x) is on the image right, the head (+z) at the top;
    project_point agrees with the projected sphere's peak."""
    center = (-12.0, 6.0, 9.0)                       # left, anterior, up
    vol = sphere_volume((48, 48, 48), 4.0, center=center)
    view = View(size=49, pixel_mm=1.0)
    row, col, mag = project_point(center, vol.center, view)
    assert (row, col, mag) == pytest.approx((24 - 9.0, 24 + 12.0, 1.0))
    peak = peak_position(project(vol, view)[0])
    assert peak == pytest.approx((row, col), abs=0.15)
    # shift moves the field: the image content moves the other way
    shifted = View(size=49, pixel_mm=1.0, shift=(5.0, -3.0))
    row2, col2, _ = project_point(center, vol.center, shifted)
    assert (row2, col2) == pytest.approx((row + 3.0, col - 5.0))
    assert peak_position(project(vol, shifted)[0]) == pytest.approx((row2, col2), abs=0.15)


@pytest.mark.parametrize("rotation,tilt", [(25.0, 0.0), (-25.0, 0.0), (0.0, 15.0), (18.0, -10.0)])
def test_project_point_matches_cone_projection(rotation, tilt):
    """In a rotated / tilted cone beam the projection of an off-centre sphere peaks where project_point
    puts its centre, magnified by sod / (distance from the source)."""
    center = (-14.0, 8.0, 10.0)
    vol = sphere_volume((56, 56, 56), 4.0, center=center)
    view = View(size=61, pixel_mm=1.0, rotation=rotation, tilt=tilt, cone=True, sid=300.0, sod=150.0)
    row, col, mag = project_point(center, vol.center, view)
    d, _, _ = view_axes(view)
    depth = 150.0 + float(torch.tensor(center, dtype=torch.float64) @ d)
    assert mag == pytest.approx(150.0 / depth)
    assert peak_position(project(vol, view)[0]) == pytest.approx((row, col), abs=0.25)


def test_rotation_and_tilt_turn_as_documented():
    """View.rotation: positive turns the patient's left towards the detector (farther from the source, so
    less magnified in a cone beam); View.tilt: positive tips the head towards the detector."""
    kw = dict(size=64, pixel_mm=1.0, cone=True, sid=300.0, sod=150.0)
    left, head = (-40.0, 0.0, 0.0), (0.0, 0.0, 40.0)
    _, _, mag_left = project_point(left, ORIGIN, View(rotation=20.0, **kw))
    _, _, mag_right = project_point((40.0, 0.0, 0.0), ORIGIN, View(rotation=20.0, **kw))
    assert mag_left < 1.0 < mag_right
    _, _, mag_head = project_point(head, ORIGIN, View(tilt=20.0, **kw))
    _, _, mag_feet = project_point((0.0, 0.0, -40.0), ORIGIN, View(tilt=20.0, **kw))
    assert mag_head < 1.0 < mag_feet
    # a point in front of the isocentre (anterior, +y) moves towards the image's left (the patient's right)
    # when the patient's left turns towards the detector
    row, col, _ = project_point((0.0, 30.0, 0.0), ORIGIN, View(rotation=20.0, size=64, pixel_mm=1.0))
    assert col == pytest.approx(31.5 - 30.0 * math.sin(math.radians(20.0)))
    assert row == pytest.approx(31.5)


def test_supersample_averages_subrays():
    """supersample=k averages k x k rays per pixel: on a linear ramp it equals the plain projection."""
    shape = (24, 24, 24)
    x, _, _ = world_coords(shape)
    vol = Volume((0.001 * (x + 20.0)).to(torch.float32)[None], centred_affine(shape))
    plain = project(vol, View(size=9, pixel_mm=2.0))
    fine = project(vol, View(size=9, pixel_mm=2.0, supersample=3))
    assert torch.allclose(plain, fine, rtol=1e-4, atol=1e-6)


def test_view_validation():
    for bad in (dict(size=0), dict(pixel_mm=0.0), dict(sid=float("nan")), dict(cone=True, sod=1900.0)):
        with pytest.raises(ValueError):
            View(**bad)


# ------------------------------------------------------------------------------------------ exact additivity

def smooth_random(shape, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g)
    return scale * torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)[0, 0]


@pytest.mark.parametrize("cone", [False, True])
def test_projection_is_exactly_additive(cone):
    """project(mu) - project(mu_soft) == project(mu - mu_soft): the bone layer is the line integral of the
    removed bone, to float rounding."""
    shape = (30, 36, 40)
    mu = smooth_random(shape, 0, 0.03)
    bone = smooth_random(shape, 1) > 0.55
    soft = torch.where(bone, torch.full_like(mu, 0.021), mu)
    vol = Volume(torch.stack([mu, soft, mu - soft]), centred_affine(shape, 1.3))
    view = View(size=48, pixel_mm=1.1, rotation=12.0, tilt=-5.0, cone=cone, sid=400.0, sod=250.0)
    L = project(vol, view)
    assert float(L[2].abs().max()) > 0.05                        # there is a bone layer to keep
    assert torch.allclose(L[0] - L[1], L[2], atol=2e-6 * float(L[0].max()))
    # channels are independent: projecting one channel alone gives the same image
    alone = project(Volume(vol.data[2:3].clone(), vol.affine), view)
    assert torch.allclose(alone[0], L[2], atol=1e-7)


def line_integral_pair(size=64, seed=0):
    """A body-like soft-tissue line-integral image and the same plus a bone layer of thin bands."""
    yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, size, dtype=torch.float64),) * 2, indexing="ij")
    body = (1 - (xx / 0.85) ** 2 - (yy / 0.95) ** 2).clamp_min(0).sqrt()
    g = torch.Generator().manual_seed(seed)
    soft = (4.0 * body + 0.1 * torch.rand(size, size, generator=g, dtype=torch.float64)).float()
    bone = (0.4 * (torch.sin(14 * yy + 3 * xx) > 0.6).double() * (body > 0)).float()
    return soft + bone, soft, bone


def test_linear_chain_is_linear():
    cxr, soft, bone = line_integral_pair()
    proc = Processing()
    out = linear_chain(torch.stack([cxr, soft, bone]), proc)
    assert torch.allclose(out[0] - out[1], out[2], atol=1e-5)
    assert torch.allclose(linear_chain(3.0 * bone[None], proc)[0], 3.0 * out[2], atol=1e-5)
    # the chain is not the identity: equalisation and unsharp masking change the bone layer
    assert float((out[2] - bone).abs().max()) > 0.05


def window_scale(cxr: torch.Tensor, bs: torch.Tensor, layer: torch.Tensor) -> tuple[float, float]:
    """Least-squares scale s with cxr - bs = s * layer on the pixels neither image clipped, and the worst
    residual relative to the layer's range."""
    ok = (cxr > 0) & (cxr < 1) & (bs > 0) & (bs < 1)
    assert int(ok.sum()) > 0.5 * ok.numel()
    a, b = layer[ok].double(), (cxr - bs)[ok].double()
    s = float((a * b).sum() / (a * a).sum())
    return s, float((b - s * a).abs().max() / (s * (a.max() - a.min())))


@pytest.mark.parametrize("dose", [None, 2000.0])
def test_radiograph_pair_keeps_the_bone_layer_exact(dose):
    """After the shared chain and one window, CXR - BS is the processed bone layer times one positive
    scale wherever neither image is clipped — with quantum noise too, since one noise field is added
    to both log images."""
    cxr_L, soft_L, _ = line_integral_pair()
    proc = Processing(dose=dose)
    cxr, bs = radiograph_pair(cxr_L, soft_L, proc, generator=torch.Generator().manual_seed(3))
    assert cxr.shape == bs.shape == (64, 64) and float(cxr.min()) >= 0 and float(cxr.max()) <= 1
    layer = linear_chain((cxr_L - soft_L)[None], proc)[0]
    s, residual = window_scale(cxr, bs, layer)
    assert s > 0 and residual < 1e-4
    if dose:
        quiet, _ = radiograph_pair(cxr_L, soft_L, Processing(dose=None))
        assert float((cxr - quiet).abs().mean()) > 1e-3                 # the noise is there
        again, _ = radiograph_pair(cxr_L, soft_L, proc, generator=torch.Generator().manual_seed(3))
        assert torch.equal(again, cxr)                                   # and seeded
        # drawn separately for each image, noise would not cancel in the difference
        g = torch.Generator().manual_seed(3)
        a, _ = radiograph_pair(cxr_L, cxr_L, proc, generator=g)
        _, b = radiograph_pair(soft_L, soft_L, proc, generator=g)
        assert window_scale(a, b, layer)[1] > 100 * max(residual, 1e-6)


# ------------------------------------------------------------------------------------------ bone removal

def test_remove_bone_grows_mask_and_keeps_everything_else():
    g = torch.Generator().manual_seed(0)
    hu = torch.empty(12, 14, 16).uniform_(-200.0, 900.0, generator=g)
    hu[6, 7, 3] = -50.0                                   # fat next to the bone: kept
    bone = torch.zeros_like(hu, dtype=torch.bool)
    bone[4:8, 5:9, 5:10] = True
    before = hu.clone()
    out = remove_bone(hu, bone)
    assert torch.equal(hu, before)                         # the input is not modified
    grown = torch.zeros_like(bone)
    grown[3:9, 4:10, 4:11] = True                          # one voxel in every direction (3x3x3 cube)
    assert torch.equal(grow_mask(bone, 1), grown)
    dense = grown & (hu > SOFT_TISSUE_HU)
    assert torch.all(out[dense] == SOFT_TISSUE_HU)
    assert torch.equal(out[~dense], hu[~dense])           # marrow/fat in the mask and all else unchanged
    assert float(out[6, 7, 3]) == -50.0
    # the rim voxel two steps out is untouched; grow=0 uses the mask as it is
    assert float(out[6, 7, 2]) == float(hu[6, 7, 2])
    exact = remove_bone(hu, bone, grow=0)
    assert torch.equal(exact[~bone], hu[~bone]) and torch.all(exact[bone] <= SOFT_TISSUE_HU)
    with pytest.raises(ValueError, match="shape"):
        remove_bone(hu, bone[:-1])


def test_bone_removal_layer_projects_to_bone_only():
    """The projected difference of a volume and its bone-free copy is zero on rays that miss the bone."""
    shape = (32, 32, 32)
    x, y, z = world_coords(shape)
    hu = torch.where(x ** 2 + y ** 2 < 14 ** 2, torch.tensor(40.0, dtype=torch.float64),
                     torch.tensor(-1000.0, dtype=torch.float64)).float()
    bone = (x.abs() < 2.5) & (z.abs() < 20)                  # a vertical bar, 5 mm wide, through the body
    hu = torch.where(bone, torch.full_like(hu, 700.0), hu)
    soft = remove_bone(hu, bone)
    vol = Volume(torch.stack([hu_to_mu(hu), hu_to_mu(soft)]), centred_affine(shape))
    L = project(vol, View(size=33, pixel_mm=1.0))
    diff = (L[0] - L[1]).numpy()
    cols = np.abs(np.arange(33) - 16.0)
    assert diff[:, cols > 4.5].max() < 1e-6                 # beyond the grown bar (2.5 + 1 voxel + ramp)
    assert diff[16, cols < 2].min() > 0.1
