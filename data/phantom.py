"""Synthetic chest-radiograph phantom: the embedded default dataset (nothing to download).

Each case is a posterior-anterior chest radiograph simulated from per-pixel thickness maps, not
painted: soft tissue t_soft(x, y) and bone t_bone(x, y), in cm along the beam, give the X-ray line
integral L = MU_SOFT * t_soft + MU_BONE * t_bone (I = I0 exp(-L)). After detector blur, quantum
noise and a large-scale dynamic-range compression, a monotone display transform (window + sigmoid)
maps L to [0, 1]: bones bright, lungs dark, air outside the body black. The soft-tissue target is
the same patient with t_bone = 0, shown with its own, slightly darker, display processing as
dual-energy soft-tissue images are. So bone suppression is not a subtraction in display space.

Geometry is defined in normalised anatomical coordinates, independent of the resolution:
* x in [-1, 1] runs from image left to image right (the patient's right lung is on the image left);
* y in [-1, 1] runs from top to bottom; one unit is CM_PER_UNIT cm.

A random pose (shift, zoom, small rotation) maps pixel centres to these coordinates. All random
anatomy is drawn before anything that depends on the size, so one seed gives the same patient at
64 or 1024 pixels; only the sensor noise differs.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from skimage.filters import gaussian
from skimage.transform import resize
from tqdm import tqdm

from data.io import write_png
from utils.atomic import atomic_write

CM_PER_UNIT = 21.5   # the [-1, 1] field spans 43 cm, the usual chest cassette
MU_SOFT = 0.20       # 1/cm, water-like tissue at the ~60 keV effective energy of a chest beam
MU_BONE = 0.50       # 1/cm, cortical bone at the same energy
BONE_VIEW = (-0.10, 0.50)  # display range of the signed bone image when written to PNG
# The soft-tissue image's own display (darker, flatter) uses the drawn offsets an.win_bs times this.
# At 1 the bone image was 66 % tone against 53 % on the real SZCH pairs; 0.45 with the trabecular
# pattern brings every frequency band within 0.75-1.38x of the real pairs' (16 phantoms against the two
# pairs at 256², tests/test_phantom.py; README, phantom realism).
BS_DISPLAY = 0.45
TRABECULAR_GRID = 512          # samples of the trabecular pattern across [-1.1, 1.1]: ~2 per pixel at 256²
TRABECULAR_BAND = (0.7, 2.5)   # difference-of-Gaussians band of the pattern, in grid samples
TRABECULAR_AMP = 0.9           # std of the relative bone-density modulation (clipped at zero density)


@dataclass
class Phantom:
    """One synthetic case; all arrays are (H, W) with H = W = size.

    Attributes:
        cxr: float32 in [0, 1], the radiograph in standard display (bones bright, air dark).
        bs: float32 in [0, 1], the soft-tissue (bone-suppressed) target of the same patient.
        bone: float32, cxr - bs (signed; mostly positive: bones and the darker bs display).
        mask: bool, union of both lung fields.
        nodules: list of (row, col, radius_px) floats, the soft-tissue lesions placed in the lungs.
    """

    cxr: np.ndarray
    bs: np.ndarray
    bone: np.ndarray
    mask: np.ndarray
    nodules: list


# ------------------------------------------------------------------------------ profiles

def _ramp(u):
    """0 for u <= 0 rising like a circle chord, sqrt(1 - (1 - u)^2), to 1 at u >= 1."""
    u = np.clip(u, 0.0, 1.0)
    return np.sqrt(u * (2.0 - u))


def _chord(d, r):
    """Path length 2 sqrt(r^2 - d^2) through a cylinder or sphere of radius r at distance d."""
    return 2.0 * np.sqrt(np.maximum(r * r - d * d, 0.0))


def _shell(d, w, h, wall=0.3, marrow=0.3):
    """Bone path (cm) through an elliptic tube with a cortex, at distance d (units) from its axis.

    w is the half-width in the image plane (units), h the half-depth along the beam (cm). The marrow
    cavity, ``wall`` (fraction of w and h) inside the surface, has relative density ``marrow``. The
    cortex seen edge-on gives the bright margins of real ribs and vertebrae.
    """
    u = d / w
    outer = np.sqrt(np.maximum(1.0 - u * u, 0.0))
    ui = u / (1.0 - wall)
    inner = (1.0 - wall) * np.sqrt(np.maximum(1.0 - ui * ui, 0.0))
    return 2.0 * h * (outer - (1.0 - marrow) * inner)


def _segment_dist(X, Y, p0, p1):
    """Distance from each point (X, Y) to the segment p0-p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((X - p0[0]) * dx + (Y - p0[1]) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(X - p0[0] - t * dx, Y - p0[1] - t * dy)


def _ellipse_q(X, Y, cx, cy, a, b, theta=0.0):
    """Normalised radius q of a rotated ellipse (q = 1 on it), with its local coordinates u, v."""
    c, s = np.cos(theta), np.sin(theta)
    u = ((X - cx) * c + (Y - cy) * s) / a
    v = (-(X - cx) * s + (Y - cy) * c) / b
    return np.sqrt(u * u + v * v) + 1e-6, u, v


def _ellipse_dist(X, Y, cx, cy, a, b, theta=0.0):
    """Approximate signed distance (negative inside) to a rotated ellipse: (q - 1) / |grad q|.

    Accurate near the outline, which is where it is used (edge ramps); not deep inside.
    """
    q, u, v = _ellipse_q(X, Y, cx, cy, a, b, theta)
    return (q - 1.0) * q / np.sqrt((u / a) ** 2 + (v / b) ** 2 + 1e-12)


# ------------------------------------------------------------------------------ anatomy

def _sample_anatomy(rng: np.random.Generator) -> SimpleNamespace:
    """Draw every random anatomical parameter, in a fixed order that does not depend on the size.

    Values are Python floats so that float32 pixel arrays stay float32 (NEP 50).
    """
    def u(lo, hi):
        return float(rng.uniform(lo, hi))

    an = SimpleNamespace()
    an.rot, an.zoom, an.shift = u(-0.04, 0.04), u(0.93, 1.05), (u(-0.04, 0.04), u(-0.03, 0.05))
    # Body: chest half-width, depth (cm), neck, shoulder line, arms along the sides.
    an.torso_hw, an.waist, an.depth = u(0.84, 0.92), u(0.08, 0.16), u(19.0, 24.0)
    an.neck_hw, an.shoulder_y, an.shoulder_k = u(0.26, 0.34), u(-1.0, -0.9), u(0.35, 0.5)
    an.arm_x, an.arm_r = u(1.0, 1.08), u(0.14, 0.18)
    an.breast = u(0, 1) < 0.4
    an.breast_y, an.breast_r = u(0.35, 0.6), u(0.22, 0.32)
    an.stomach = (u(0, 1) < 0.5, u(0.25, 0.45), u(0.05, 0.09))  # gas bubble under the left dome
    # Lungs, one set per side: sigma = -1 patient right (image left), +1 patient left.
    an.apex_y, an.dome_y = u(-0.74, -0.64), u(0.34, 0.48)
    an.lungs = []
    for sigma in (-1, 1):
        an.lungs.append(SimpleNamespace(
            sigma=sigma, apex_y=an.apex_y + u(-0.02, 0.02), apex_x=u(0.29, 0.35),
            lat_w=u(0.6, 0.7), wide_y=u(0.1, 0.3), med_w=u(0.08, 0.12), med_y=u(-0.5, -0.35),
            # the left dome sits lower, under the heart
            dome_y=an.dome_y + (u(0.02, 0.1) if sigma > 0 else 0.0), dome_x=u(0.3, 0.4),
            cp_drop=u(0.12, 0.22), med_drop=u(0.02, 0.08), depth=u(12.0, 15.0)))
    an.heart = (u(0.15, 0.2), an.dome_y + u(-0.1, -0.04), u(0.3, 0.36), u(0.21, 0.25), u(0.3, 0.5))
    an.knob = (u(0.1, 0.13), u(-0.36, -0.28), u(0.05, 0.065))
    an.hilum_y, an.rc_air = u(-0.2, -0.08), u(3.5, 5.0)
    # Spine: lateral offset and a slight scoliosis; thoracic level spacing grows downwards.
    an.spine = (u(-0.03, 0.03), u(0.0, 0.025), u(0.5, 1.2), u(0.0, 2 * np.pi))
    an.t1_y, an.t_space = an.apex_y - u(0.02, 0.07), u(0.105, 0.12)
    # Ribs: slope and bend of the posterior arc, drop of the anterior arc, jitter per rib.
    an.rib_m, an.rib_b, an.rib_ant = u(0.15, 0.3), u(0.16, 0.2), u(1.5, 2.0)
    an.rib_jit = rng.uniform(0.9, 1.1, size=(2, 12, 3)).tolist()
    an.clav = (u(-0.6, -0.5), u(0.06, 0.16), u(0.72, 0.82), u(0.01, 0.025))
    an.scap = (u(0.55, 0.62), u(-0.1, 0.05))
    # Lesions and lung texture (vessel trees are drawn in _vessel_tree from the same generator).
    an.n_nodules = int(rng.choice(4, p=[0.15, 0.4, 0.3, 0.15]))
    an.nod_cand = rng.uniform((-0.7, -0.65, 0.02), (0.7, 0.45, 0.045), size=(64, 3))
    an.trees = [_vessel_tree(rng, sigma, an.hilum_y) for sigma in (-1, 1)]
    noise = rng.standard_normal((128, 128))
    an.texture = gaussian(noise, 1.0) - gaussian(noise, 4.0)
    an.texture /= an.texture.std()
    # Acquisition and display: exposure (quanta/pixel), window, tone curve, soft-tissue offsets.
    an.n0 = 10 ** u(3.8, 4.6)
    an.eq = u(0.35, 0.5)
    an.win = (u(-0.15, -0.03), u(5.6, 6.4), u(0.35, 0.45), u(0.18, 0.25))
    an.win_bs = (u(0.0, 0.1), u(0.0, 0.3), u(0.01, 0.04), u(0.95, 1.05))
    # Trabecular bone: a fine random pattern that modulates the bone density (drawn last, so the
    # anatomy above stays that of earlier versions). Real bone images carry most of their fine-scale
    # energy in it; without it the phantom's bone image is too smooth (README, phantom realism).
    noise = rng.standard_normal((TRABECULAR_GRID, TRABECULAR_GRID))
    an.trabecular = gaussian(noise, TRABECULAR_BAND[0]) - gaussian(noise, TRABECULAR_BAND[1])
    an.trabecular /= an.trabecular.std()
    return an


def _vessel_tree(rng, sigma, hilum_y, depth=6):
    """Branching pulmonary vessels from one hilum: rows (x0, y0, x1, y1, radius) in units."""
    # the hilar trunk (pulmonary artery and veins), then six roots each splitting depth - 1 times
    segs = [(sigma * 0.13, hilum_y - 0.08, sigma * 0.19, hilum_y + 0.06, 0.032)]
    stack = []
    for ang in (-1.75, -1.0, -0.35, 0.3, 0.95, 1.5):  # from up-lateral round to down (image y down)
        a = ang + rng.uniform(-0.2, 0.2)
        stack.append((sigma * 0.17, hilum_y + rng.uniform(-0.04, 0.04), a, 0.12, 0.025, depth))
    while stack:
        x, y, a, length, r, d = stack.pop()
        x1, y1 = x + sigma * length * np.cos(a), y + length * np.sin(a)
        segs.append((x, y, x1, y1, r))
        if d > 1:
            for side in (-1, 1):
                stack.append((x1, y1, a + side * rng.uniform(0.25, 0.6),
                              length * rng.uniform(0.7, 0.85), r * 0.75, d - 1))
    return np.array(segs, dtype=np.float64)


def _lung_lateral(y, lung):
    """x of the lateral lung border at height y: rounded apex, widest at wide_y, then tapering."""
    t = np.clip((lung.wide_y - y) / (lung.wide_y - lung.apex_y), 0.0, 1.0)
    low = np.clip((y - lung.wide_y) / (lung.dome_y + 0.3 - lung.wide_y), 0.0, 1.0)
    return lung.apex_x + (lung.lat_w - lung.apex_x) * np.sqrt(1.0 - t * t) - 0.06 * low * low


def _lungs(X, Y, an):
    """Relative air depth P in [0, 1] of both lungs (0 outside). The lung field is P > 0.

    Each border has its own edge width: the lung thins gently towards the lateral wall and the apex,
    but ends sharply at the heart and the diaphragm, as on real films.
    """
    # the heart sits on the diaphragm: its outline extended downwards leaves no lung beneath it
    hx, hy, ha, hb, ht = an.heart
    d_heart = np.minimum(_ellipse_dist(X, Y, *an.heart),
                         _ellipse_dist(X, Y, hx, hy + 0.15, ha, hb, ht))
    d_knob = _ellipse_dist(X, Y, an.knob[0], an.knob[1], 0.8 * an.knob[2], 1.4 * an.knob[2])
    P = np.zeros_like(X)
    for lung in an.lungs:
        xs = lung.sigma * X
        t = np.clip((lung.med_y - Y) / (lung.med_y - lung.apex_y), 0.0, 1.0)
        x_med = lung.apex_x - (lung.apex_x - lung.med_w) * np.sqrt(1.0 - t * t)
        lateral = np.clip((xs - lung.dome_x) / (lung.lat_w - lung.dome_x), 0.0, None)
        medial = np.clip((lung.dome_x - xs) / (lung.dome_x - lung.med_w), 0.0, None)
        y_dome = lung.dome_y + lung.cp_drop * lateral ** 2 + lung.med_drop * medial ** 2
        p = (_ramp((_lung_lateral(Y, lung) - xs) / 0.1) * _ramp((xs - x_med) / 0.05)
             * _ramp((y_dome - Y) / 0.03) * _ramp(d_heart / 0.025))
        if lung.sigma > 0:
            p = p * _ramp(d_knob / 0.025)
        P = P + p
    return P


def _soft_tissue(X, Y, an, P, px):
    """Soft-tissue path t_soft (cm): body minus air (lungs, airways, stomach) plus vessels."""
    ax = np.abs(X)
    hw = an.torso_hw - an.waist * np.clip((Y + 0.2) / 1.2, 0.0, 1.0)
    prof = np.sqrt(1.0 - np.clip(ax / hw, 0.0, 1.0) ** 2)
    top = an.shoulder_y + an.shoulder_k * ax * ax
    # thinner over the shoulders than through the chest, thicker again over the abdomen
    shape = _ramp((Y - top) / 0.2) * (0.65 + 0.35 * np.clip((Y - top) / 0.45, 0.0, 1.0))
    body = an.depth * prof * shape * (1.0 + 0.25 * np.clip(Y, 0.0, 1.0))
    body = np.maximum(body, 0.55 * an.depth * np.sqrt(np.maximum(1.0 - (X / an.neck_hw) ** 2, 0.0)))
    for s in (-1, 1):  # arms hanging down the sides, shoulders as rounded masses
        d = _segment_dist(X, Y, (s * 0.9, -0.62), (s * an.arm_x, 1.3))
        body = np.maximum(body, CM_PER_UNIT * _chord(d, an.arm_r))
        body = np.maximum(body, CM_PER_UNIT * _chord(np.hypot(X - s * 0.84, Y + 0.6), 0.2))
        if an.breast:
            q = np.hypot((X - s * 0.42) / 1.6, Y - an.breast_y)
            body = body + 0.25 * CM_PER_UNIT * _chord(q, an.breast_r) * (ax < an.torso_hw)
    # Air: the lungs, a little shallower at the base where breasts and diaphragm overlie them.
    air = np.zeros_like(X)
    for lung in an.lungs:
        side = (lung.sigma * X > 0)
        frac = np.clip((Y - lung.apex_y) / (lung.dome_y - lung.apex_y), 0.0, 1.0)
        air = air + side * P * lung.depth * (1.0 - 0.2 * frac)
    # Lung also lies in front of and behind the heart and mediastinum: smooth, no edge of its own.
    rc = np.clip((1.0 - _ellipse_q(X, Y, *an.heart)[0]) / 0.7, 0.0, 1.0)
    med = (np.clip((0.25 - np.abs(X - an.spine[0])) / 0.15, 0.0, 1.0)
           * np.clip((Y - an.apex_y - 0.1) / 0.3, 0.0, 1.0))
    rc = np.maximum(rc, med) * np.clip((an.dome_y + 0.1 - Y) / 0.3, 0.0, 1.0)
    air = air + an.rc_air * rc * rc * (3.0 - 2.0 * rc)
    x0 = an.spine[0] - 0.015  # trachea and main bronchi
    d = _segment_dist(X, Y, (x0, -1.2), (x0, an.hilum_y - 0.2))
    air = air + CM_PER_UNIT * 0.8 * _chord(d, 0.045)
    for s in (-1, 1):
        d = _segment_dist(X, Y, (x0, an.hilum_y - 0.2), (s * 0.16, an.hilum_y - 0.04))
        air = air + CM_PER_UNIT * 0.8 * _chord(d, 0.03)
    on, sx, sr = an.stomach
    if on:
        q = np.hypot((X - sx) / 1.6, Y - an.lungs[1].dome_y - sr - 0.04)
        air = air + CM_PER_UNIT * 0.5 * _chord(q, sr)
    soft = np.maximum(body - air, 0.2 * body)
    # Lung parenchyma: mottled texture and vessels, visible only where they displace air.
    inside = np.clip(P / 0.25, 0.0, 1.0)
    soft = soft + inside * (0.6 + 0.5 * _sample_field(an.texture, X, Y))
    return soft + inside * _render_vessels(X, Y, an, px)


def _sample_field(field, X, Y):
    """Bilinear sample of a square field covering [-1.1, 1.1]^2 at anatomical points (X, Y)."""
    n = field.shape[0]
    fx = np.clip((X + 1.1) / 2.2 * (n - 1), 0, n - 1.001)
    fy = np.clip((Y + 1.1) / 2.2 * (n - 1), 0, n - 1.001)
    i, j = fy.astype(np.int64), fx.astype(np.int64)
    wy, wx = (fy - i).astype(np.float32), (fx - j).astype(np.float32)
    f = field.astype(np.float32)
    return ((f[i, j] * (1 - wx) + f[i, j + 1] * wx) * (1 - wy)
            + (f[i + 1, j] * (1 - wx) + f[i + 1, j + 1] * wx) * wy)


def _box(X, Y, xs, ys, margin):
    """Slices of the pixel box whose anatomical coordinates may lie within ``margin`` of points."""
    # X and Y are affine in the pixel indices, so each pixel's coordinates can be inverted exactly.
    H, W = X.shape
    ex = (X[0, 1] - X[0, 0], Y[0, 1] - Y[0, 0])
    ey = (X[1, 0] - X[0, 0], Y[1, 0] - Y[0, 0])
    det = ex[0] * ey[1] - ex[1] * ey[0]
    px, py = np.asarray(xs) - X[0, 0], np.asarray(ys) - Y[0, 0]
    cols = (px * ey[1] - py * ey[0]) / det
    rows = (py * ex[0] - px * ex[1]) / det
    m = margin / np.hypot(*ex) + 2
    r0, r1 = int(max(rows.min() - m, 0)), int(min(rows.max() + m + 1, H))
    c0, c1 = int(max(cols.min() - m, 0)), int(min(cols.max() + m + 1, W))
    return (slice(r0, r1), slice(c0, c1)) if r0 < r1 and c0 < c1 else None


def _render_vessels(X, Y, an, px):
    """Soft-tissue path (cm) of both vessel trees; vessels thinner than a pixel keep their mass."""
    out = np.zeros_like(X)
    for tree in an.trees:
        for x0, y0, x1, y1, r in tree:
            box = _box(X, Y, (x0, x1), (y0, y1), r + px)
            if box is None:
                continue
            d = _segment_dist(X[box], Y[box], (x0, y0), (x1, y1))
            re = max(r, 0.7 * px)  # widen sub-pixel vessels, lowering the density to keep the area
            out[box] = np.maximum(out[box], CM_PER_UNIT * _chord(d, re) * (r / re) ** 2)
    return out


# ------------------------------------------------------------------------------ bones

def _spine_levels(an):
    """Centres, half-heights and half-widths of C3..L4 vertebrae; index 5 is T1."""
    sp = [0.075] * 5 + [an.t_space * (1 + 0.15 * k / 11) for k in range(12)] + [0.14] * 4
    yc = an.t1_y + np.concatenate([-np.cumsum(sp[:5][::-1])[::-1], np.cumsum([0.0] + sp[5:-1])])
    hw = np.concatenate([np.full(5, 0.06), np.linspace(0.07, 0.095, 12), np.full(4, 0.105)])
    return yc, 0.4 * np.array(sp), hw


def _spine_x(y, an):
    x0, amp, freq, ph = an.spine
    return x0 + amp * np.sin(np.pi * freq * (y + 1.0) + ph)


def _spine(X, Y, an):
    """Bone path (cm) of the spine: bodies with cortex and endplates, pedicles, processes."""
    yc, hv, wv = _spine_levels(an)
    xs = X - _spine_x(Y, an)
    i = np.clip(np.searchsorted((yc[1:] + yc[:-1]) / 2, Y), 0, len(yc) - 1)
    yc, hv, wv = yc[i].astype(np.float32), hv[i].astype(np.float32), wv[i].astype(np.float32)
    ey = (Y - yc) / hv
    env = _ramp((1.0 - np.abs(ey)) / 0.4)
    body = _shell(np.abs(xs), wv, 0.75, wall=0.15, marrow=0.3) * env
    body = body + 0.3 * np.exp(-(((np.abs(ey) - 0.9) / 0.08) ** 2)) * (np.abs(xs) < wv)  # endplates
    ped = np.hypot((np.abs(xs) - 0.65 * wv) / (0.2 * wv), (ey + 0.2) / 0.35)  # seen end-on: rings
    body = body + 0.4 * (np.sqrt(np.maximum(1 - ped ** 2, 0))
                         - 0.6 * np.sqrt(np.maximum(1 - (ped / 0.6) ** 2, 0)))
    spinous = np.hypot(xs / (0.13 * wv), (ey - 0.45) / 0.6)
    body = body + 0.5 * np.sqrt(np.maximum(1.0 - spinous ** 2, 0.0))
    d = _segment_dist(np.abs(xs) / wv, ey, (0.7, -0.3), (1.5, -0.5))  # transverse processes
    return body + _shell(d, 0.3, 0.35)


def _rib(X, Y, an, lung, k, y0, out):
    """Add rib k (0-based) of one side to ``out``.

    Posterior arc: leaves the spine at height y0, runs laterally with slope m (upper ribs level,
    lower ribs falling) and bends down, along a sheared ellipse quadrant of depth b, to the lateral
    chest wall at (a, yc). Anterior arc: from there medially and further down to the costal
    cartilage at (x_end, y_end). It is a parabola x(y), vertical at the wall and oblique at its end,
    as anterior ribs look on PA films. Near the wall the rib runs along the beam, so its path length
    grows there.
    """
    jb, jw, jh = an.rib_jit[(lung.sigma + 1) // 2][k]
    m = max(an.rib_m * (k - 1.5) / 8, -0.1)
    b = an.rib_b * jb
    a = _lung_lateral(y0 + b + 0.65 * m, lung) + 0.06
    yc = y0 + b + m * a
    floating = k >= 10
    xc = _spine_x(y0, an)
    x_end = 0.12 + 0.03 * k
    y_end = yc + an.rib_ant * (0.07 + 0.03 * k)
    bottom = yc + 0.1 if floating else y_end + 0.1
    box = _box(X, Y, (xc, xc + lung.sigma * (a + 0.1)), (min(y0, yc) - 0.12, bottom), 0.05)
    if box is None:
        return
    x, y = X[box], Y[box]
    xs = lung.sigma * (x - xc)
    r = np.clip(xs / a, 0.0, 1.0)
    # Sheared ellipse u^2 + v^2 = 1, v measured from the line of slope m; distance to first order,
    # |F - 1| / |grad F|.
    u1, v1 = xs / a, (y - yc + m * (a - xs)) / b
    F = np.hypot(u1, v1) + 1e-6
    d_post = np.abs(F - 1.0) * F / np.hypot(u1 / a - v1 * m / b, v1 / b)
    s = np.clip((y_end - y) / (y_end - yc), 0.0, 1.0)
    x_ant = x_end + (a - x_end) * (1.0 - (1.0 - s) ** 2)
    slope = 2.0 * (a - x_end) * (1.0 - s) / (y_end - yc)
    d_ant = np.abs(xs - x_ant) / np.sqrt(1.0 + slope * slope)
    post = np.clip(0.5 - (y - yc) / 0.12, 0.0, 1.0)  # posterior (1) to anterior (0) blend
    # below the shear line the ellipse's other quadrant is no rib: measure to the wall point
    d_post = np.where(v1 <= 0, d_post, np.hypot(xs - a, y - yc))
    d = np.where(y < yc, d_post, d_ant)
    w = (0.032 + 0.001 * k) * jw * post + 0.03 * (1 - post)
    h = (0.45 * post + 0.18 * (1 - post)) * jh
    stretch = 1.0 + 0.6 * np.clip((r - 0.6) / 0.4, 0.0, 1.0) ** 2
    ends = _ramp((xs - 0.04) / 0.04) * (u1 > -0.2)
    if floating:
        ends = ends * _ramp((yc - 0.05 - y) / 0.1) * _ramp((0.85 * a - xs) / 0.15)
    else:
        tip = _ramp((xs - x_end) / 0.05) * _ramp((y_end + 0.03 - y) / 0.03)
        ends = ends * np.where(y < yc, 1.0, tip)
    out[box] += _shell(d, w, h, wall=0.3, marrow=0.3) * stretch * ends


def _bones(X, Y, an):
    """Bone path length t_bone (cm): spine, 12 rib pairs, clavicles, scapulae, humeri."""
    out = _spine(X, Y, an)
    yc, hv, _ = _spine_levels(an)
    for lung in an.lungs:
        for k in range(12):
            _rib(X, Y, an, lung, k, float(yc[5 + k] - 0.3 * hv[5 + k]), out)
    cy, rise, xl, amp = an.clav
    for s in (-1, 1):
        xs = s * X
        t = np.clip((xs - 0.1) / (xl - 0.1), 0.0, 1.0)
        yy = cy - rise * t + amp * np.sin(2 * np.pi * t)
        slope = (-rise + 2 * np.pi * amp * np.cos(2 * np.pi * t)) / (xl - 0.1)
        d = np.abs(Y - yy) / np.sqrt(1 + slope * slope)
        ends = _ramp((xs - 0.08) / 0.04) * _ramp((xl + 0.02 - xs) / 0.04)
        out += _shell(d, 0.036 - 0.006 * t, 1.1 - 0.4 * t, wall=0.35, marrow=0.4) * ends
        # scapula: thin plate with a thick lateral border, mostly outside the lung field
        sx, sy = an.scap
        d_lat = _segment_dist(xs, Y, (0.88, -0.55), (sx + 0.12, sy))
        plate = (xs > sx + 0.12 * np.clip((Y + 0.72) / (sy + 0.72), 0, 1)) * (Y > -0.72) * (Y < sy)
        plate = plate * (xs < 0.88 - (0.88 - sx - 0.12) * np.clip((Y + 0.55) / (sy + 0.55), 0, 1))
        out += 0.2 * plate + _shell(d_lat, 0.03, 0.5)
        d = _segment_dist(xs, Y, (sx - 0.05, -0.6), (xl + 0.08, cy - rise - 0.02))
        out += _shell(d, 0.022, 0.5)  # scapular spine and acromion
        # humerus: head (cancellous, cortex rim) and shaft down the arm
        out += _shell(np.hypot(xs - 0.93, Y + 0.55), 0.11, 1.2, wall=0.12, marrow=0.35)
        d = _segment_dist(xs, Y, (0.95, -0.5), (an.arm_x + 0.02, 1.3))
        out += _shell(d, 0.05, 0.7, wall=0.35, marrow=0.2)
    return out


# ------------------------------------------------------------------------------ imaging

def _equalise(L, strength, ref=3.0):
    """Compress large-scale dynamic range above ``ref``, as radiography workstations do.

    The low-pass (sigma 0.25 of the half-field) is taken on a 64^2 copy, so the cost does not
    depend on the size. Only regions whose surroundings are denser than ``ref`` (mediastinum,
    abdomen) are lowered; lungs and the air around the body are left as they are.
    """
    low = resize(L, (64, 64), anti_aliasing=True)
    low = resize(gaussian(low, 8.0), L.shape, order=1)
    return L - strength * np.maximum(low - ref, 0.0).astype(np.float32)


def _display(L, lo, hi, mid, width):
    """Monotone display transform: window [lo, hi] of the line integral, then a sigmoid tone curve.

    The sigmoid (centre ``mid``, scale ``width`` in window units) is rescaled to map 0 -> 0 and
    1 -> 1. Like a film characteristic curve it keeps the lungs dark but detailed and compresses
    the mediastinum and abdomen near white without clipping them.
    """
    x = np.clip((L - lo) / (hi - lo), 0.0, 1.0)
    s0, s1 = 1.0 / (1.0 + np.exp(mid / width)), 1.0 / (1.0 + np.exp((mid - 1.0) / width))
    return ((1.0 / (1.0 + np.exp((mid - x) / width)) - s0) / (s1 - s0)).astype(np.float32)


def generate_phantom(seed: int, size: int = 256) -> Phantom:
    """Simulate one chest radiograph, its soft-tissue target, bone image and lung mask.

    The patient has a body outline with neck, shoulders and arms, two lungs with vessels, a heart
    and mediastinum with trachea, diaphragm domes, spine, 12 rib pairs (posterior and anterior
    arcs), clavicles, scapulae, humeri, sometimes breasts and a gastric bubble, and 0-3 nodules.
    Anatomy, size, pose, contrast and exposure vary with the seed.

    Args:
        seed: any value ``numpy.random.default_rng`` accepts; same seed -> bit-identical arrays.
        size: H = W in pixels (>= 16); the anatomy is defined in normalised coordinates and scales.
    Returns:
        a :class:`Phantom` with float32 (size, size) cxr/bs in [0, 1], bone = cxr - bs, bool mask.
    """
    return _simulate(seed, size)


def _simulate(seed, size: int, lesions: bool = True) -> Phantom:
    """generate_phantom; lesions=False: the same patient and noise without the nodules (tests)."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng(seed)
    an = _sample_anatomy(rng)
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0)
    xp, yp = np.meshgrid(c - an.shift[0], c - an.shift[1])
    cr, sr = np.cos(an.rot), np.sin(an.rot)
    X = ((cr * xp + sr * yp) / an.zoom).astype(np.float32)  # pixel -> anatomy: rotate back, unzoom
    Y = ((-sr * xp + cr * yp) / an.zoom).astype(np.float32)
    px = 2.0 / size / an.zoom  # pixel pitch in anatomical units

    P = _lungs(X, Y, an)
    mask = P > 0
    # Nodules: the first accepted candidates well inside a lung and apart from each other.
    nodules, t_nod = [], np.zeros_like(X)
    cand = an.nod_cand
    inside = _lungs(cand[:, 0].astype(np.float32), cand[:, 1].astype(np.float32), an)
    for (x, y, r), p in zip(cand, inside):
        if len(nodules) == an.n_nodules:
            break
        if p > 0.5 and all(np.hypot(x - n[0], y - n[1]) > 0.2 for n in nodules):
            nodules.append((x, y, r))
            # a solid lesion: a sphere of tissue slightly denser than water
            t_nod += 1.1 * CM_PER_UNIT * _chord(np.hypot(X - x, Y - y), r) * lesions
    t_soft = _soft_tissue(X, Y, an, P, px) + t_nod
    t_bone = _bones(X, Y, an) * np.maximum(1.0 + TRABECULAR_AMP * _sample_field(an.trabecular, X, Y), 0.0)

    # Line integrals, detector blur, then quantum noise (std grows as exp(L/2): fewer photons
    # behind dense tissue) plus a floor of electronic noise. The soft-tissue image shares the noise
    # field, as a dual-energy pair does, with a little independent noise of its own.
    L_bs = MU_SOFT * t_soft
    L_cxr = L_bs + MU_BONE * t_bone
    z, z2 = rng.standard_normal((2, size, size), dtype=np.float32)
    out = []
    for L, extra in ((L_cxr, 0.0), (L_bs, 0.3)):
        L = _equalise(gaussian(L, 0.6), an.eq)
        std = np.sqrt(np.exp(np.minimum(L, 6.0)) / an.n0) + 0.02
        out.append(L + std * (z + extra * z2))
    lo, hi, mid, width = an.win
    dlo, dhi, dmid = (BS_DISPLAY * v for v in an.win_bs[:3])
    dwidth = 1.0 + BS_DISPLAY * (an.win_bs[3] - 1.0)
    cxr = _display(out[0], lo, hi, mid, width)
    bs = _display(out[1], lo + dlo, hi + dhi, mid + dmid, width * dwidth)

    # Report nodule centres in pixel coordinates (inverse of the pose).
    found = []
    for x, y, r in nodules:
        xq, yq = x * an.zoom, y * an.zoom
        col = (cr * xq - sr * yq + an.shift[0] + 1.0) * size / 2 - 0.5
        row = (sr * xq + cr * yq + an.shift[1] + 1.0) * size / 2 - 0.5
        found.append((float(row), float(col), float(r * an.zoom * size / 2)))
    return Phantom(cxr=cxr, bs=bs, bone=cxr - bs, mask=mask, nodules=found)


def case_seed(seed: int, i: int) -> int:
    """Seed of case i in a dataset written with ``seed``: SeedSequence([seed, i]) as one uint32."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def _write_case(args) -> list[tuple[str, str, str, str]]:
    """Simulate and write case i (a worker of :func:`write_synthetic_dataset`); returns its nodule rows."""
    root, i, size, seed, bit_depth = args
    ph = generate_phantom(case_seed(seed, i), size)
    name = f"phantom_{i:04d}.png"
    view = np.clip((ph.bone - BONE_VIEW[0]) / (BONE_VIEW[1] - BONE_VIEW[0]), 0.0, 1.0)
    write_png(root / "CXR" / name, ph.cxr, bit_depth=bit_depth)
    write_png(root / "BS" / name, ph.bs, bit_depth=bit_depth)
    write_png(root / "Bone" / name, view, bit_depth=bit_depth)
    write_png(root / "Mask" / name, ph.mask)
    return [(name, f"{r:.2f}", f"{c:.2f}", f"{rad:.2f}") for r, c, rad in ph.nodules]


def write_synthetic_dataset(root, n: int, size: int = 256, seed: int = 0, bit_depth: int = 8,
                            progress: bool = True, workers: int | None = None) -> list[str]:
    """Write n phantom cases in the dataset layout the training scripts read.

    Args:
        root: output folder (created); existing files of the same names are replaced.
        n: number of cases; size: H = W in pixels; seed: dataset seed.
        bit_depth: 8 or 16 for CXR/, BS/ and Bone/ (masks are always 8-bit).
        progress: show a tqdm progress bar.
        workers: processes that simulate cases in parallel (default: the CPU count, at most 8);
            1 runs in this process. Every case has its own seed, so the files do not depend on it.

    Files: root/CXR/<name>, root/BS/<name>, root/Bone/<name>, root/Mask/<name> (0/255, 8-bit) and
    root/nodules.csv (name,row,col,radius in pixels, one row per lesion). Bone/ holds the signed
    cxr - bs image rescaled for viewing, (bone - BONE_VIEW[0]) / (BONE_VIEW[1] - BONE_VIEW[0])
    clipped to [0, 1]; recompute the exact bone image from CXR and BS. Case i is
    generate_phantom(case_seed(seed, i), size), so any case can be regenerated alone.

    Returns:
        the file names, "phantom_0000.png", ... in case order.
    """
    import os

    root = Path(root)
    jobs = [(root, i, size, seed, bit_depth) for i in range(n)]
    workers = min(workers or os.cpu_count() or 1, 8, max(n, 1))
    bar = tqdm(total=n, desc="phantoms", disable=not progress)
    rows = []
    if workers > 1:
        import multiprocessing

        # spawn, not fork: the caller may hold torch's thread pools, which a fork can deadlock
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for case_rows in pool.imap(_write_case, jobs, chunksize=4):
                rows += case_rows
                bar.update()
    else:
        for job in jobs:
            rows += _write_case(job)
            bar.update()
    bar.close()
    names = [f"phantom_{i:04d}.png" for i in range(n)]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([("name", "row", "col", "radius")] + rows)

    atomic_write(root / "nodules.csv", write_csv)
    return names
