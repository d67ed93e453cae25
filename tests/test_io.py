"""Image I/O: every format round trip, the real samples and DICOM, and every kind of bad file."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.io import ImageError, XrayImage, read_image, to_uint, write_dicom, write_png
from data.transforms import from_model, resize, to_model
from tests.conftest import write_gray


def ramp(h=48, w=40, bits=8):
    x = np.linspace(0, 1, h * w).reshape(h, w)
    return to_uint(x, bits)


# ------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip(tmp_path, bits):
    arr = ramp(bits=bits)
    write_png(tmp_path / "a.png", arr)
    img = read_image(tmp_path / "a.png")
    assert isinstance(img, XrayImage) and img.bit_depth == bits and img.size == (48, 40)
    assert img.pixels.dtype == np.float32 and 0 <= img.pixels.min() and img.pixels.max() <= 1
    np.testing.assert_array_equal(to_uint(img.pixels, bits), arr)   # lossless, full bit depth


def test_float_png_write_rounds_and_clips(tmp_path):
    x = np.array([[-0.5, 0.0, 0.5, 1.0, 1.7, np.nan]], dtype=np.float32)
    write_png(tmp_path / "f.png", x)
    got = np.asarray(Image.open(tmp_path / "f.png"))
    np.testing.assert_array_equal(got, [[0, 0, 128, 255, 255, 0]])
    write_png(tmp_path / "f16.png", x, bit_depth=16)
    assert read_image(tmp_path / "f16.png").bit_depth == 16


@pytest.mark.parametrize("bits", [8, 16])
def test_tiff_round_trip(tmp_path, bits):
    arr = ramp(bits=bits)
    Image.fromarray(arr).save(tmp_path / "a.tif")
    img = read_image(tmp_path / "a.tif")
    assert img.bit_depth == bits
    np.testing.assert_array_equal(to_uint(img.pixels, bits), arr)


def test_jpeg_read(tmp_path):
    arr = ramp()
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    assert img.bit_depth == 8 and img.size == arr.shape
    assert np.abs(img.pixels * 255 - arr).mean() < 2.0       # lossy, but close


def test_gray_stored_as_rgb_is_accepted(tmp_path):
    arr = ramp()
    Image.fromarray(np.stack([arr] * 3, -1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(to_uint(read_image(tmp_path / "rgb.png").pixels), arr)


def test_real_samples(szch_samples):
    for i in (0, 1):
        cxr, bs = read_image(szch_samples / "CXR" / f"{i}.png"), read_image(szch_samples / "BS" / f"{i}.png")
        assert cxr.size == bs.size == (1024, 1024) and cxr.bit_depth == 8
        # CXR - BS > 0 on most pixels: the soft-tissue image is the darker one (docs/method.md §1.1)
        assert ((cxr.pixels - bs.pixels) > 0).mean() > 0.5
        assert cxr.pixels.min() == 0.0   # pure-black border pixels


def test_real_dicom_monochrome1(dicom_chest, tmp_path):
    img = read_image(dicom_chest)
    assert img.size == (1955, 1841) and img.bit_depth == 15
    assert img.meta["photometric"] == "MONOCHROME1" and img.dicom is not None
    raw = img.dicom.pixel_array.astype(np.float64)
    # its VOI window 15000/30000 (pydicom's LINEAR: 0 -> black, 29999 -> white), then inverted: the
    # brightest stored value becomes the darkest pixel, full 15-bit precision kept
    assert img.meta["display"] == "VOI window 15000/30000"
    np.testing.assert_allclose(img.pixels, 1 - raw / 29999, atol=1e-6)
    assert len(np.unique(img.pixels)) > 256
    # lungs (air) dark, mediastinum and spine bright in display convention
    h, w = img.size
    centre = img.pixels[h // 3: 2 * h // 3, w // 2 - 50: w // 2 + 50].mean()
    lung = img.pixels[h // 3: 2 * h // 3, w // 4 - 50: w // 4 + 50].mean()
    assert centre > lung
    # writing back keeps the encoding: stored values identical
    write_dicom(tmp_path / "out.dcm", img.pixels, img)
    again = read_image(tmp_path / "out.dcm")
    np.testing.assert_array_equal(again.dicom.pixel_array, img.dicom.pixel_array)
    assert again.dicom.SOPInstanceUID != img.dicom.SOPInstanceUID
    assert again.dicom.StudyInstanceUID == img.dicom.StudyInstanceUID


def test_dicom_rescale_applied(dicom_chest, tmp_path):
    """Rescale slope / intercept (the modality LUT), without a VOI: the image's own modality range."""
    import pydicom

    ds = pydicom.dcmread(dicom_chest)
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, -100.0
    ds.PhotometricInterpretation = "MONOCHROME2"
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "r.dcm")
    img = read_image(tmp_path / "r.dcm")
    values = ds.pixel_array.astype(np.float64) * 2 - 100
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    write_dicom(tmp_path / "out.dcm", img.pixels, img)                 # and back, exactly
    np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "out.dcm").pixel_array, ds.pixel_array)


# ----------------------------------------------------------------------------------- bad inputs

def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(ImageError, match="missing.png: file not found"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png: empty file \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)


def test_corrupt_and_truncated(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="junk.png: not a readable image"):
        read_image(tmp_path / "junk.png")
    good = write_gray(tmp_path / "good.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="trunc.png: truncated or corrupt"):
        read_image(tmp_path / "trunc.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1\2\3")
    with pytest.raises(ImageError, match="bad.dcm: (not a readable DICOM|DICOM file has no pixel data)"):
        read_image(tmp_path / "bad.dcm")


def test_truncated_dicom(dicom_chest, tmp_path):
    data = dicom_chest.read_bytes()
    (tmp_path / "t.dcm").write_bytes(data[: len(data) - 100_000])
    with pytest.raises(ImageError, match="t.dcm"):
        read_image(tmp_path / "t.dcm")


def test_colour_transparent_and_palette(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(ImageError, match="c.png: colour image"):
        read_image(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png", allow_color=True).size == (8, 8)
    rgba = np.full((8, 8, 4), 100, np.uint8)
    rgba[0, 0, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="a.png: image with transparency"):
        read_image(tmp_path / "a.png")
    pal = Image.fromarray(ramp()).convert("P")
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").bit_depth == 8      # gray palette: accepted
    Image.fromarray(rng.random((8, 8)).astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="floating-point"):
        read_image(tmp_path / "f.tif")


def test_pixel_limit(tmp_path):
    write_gray(tmp_path / "big.png", np.zeros((100, 100), np.uint8))
    with pytest.raises(ImageError, match="exceeds the limit of 5000"):
        read_image(tmp_path / "big.png", max_pixels=5000)


def test_write_never_overwrites_input_and_leaves_no_temp(tmp_path):
    src = write_gray(tmp_path / "in.png", ramp())
    before = src.read_bytes()
    with pytest.raises(ImageError, match="refusing to overwrite an input"):
        write_png(src, np.zeros((4, 4), np.uint8), inputs=(src,))
    assert src.read_bytes() == before
    write_png(tmp_path / "out" / "o.png", ramp())
    assert sorted(os.listdir(tmp_path / "out")) == ["o.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out" / "o.png").stat().st_mode & 0o777 == 0o666 & ~umask    # not mkstemp's 0600


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    write_png(tmp_path / "o.png", ramp())
    before = (tmp_path / "o.png").read_bytes()

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(ImageError, match=r"o.png: cannot write \(disk full\)"):
        write_png(tmp_path / "o.png", np.zeros((4, 4), np.uint8))
    assert (tmp_path / "o.png").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["o.png"]


def test_write_rejects_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="expected a"):
        write_png(tmp_path / "x.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 pixels but bit_depth=16"):
        write_png(tmp_path / "x.png", np.zeros((2, 2), np.uint8), bit_depth=16)


# ----------------------------------------------------------------------------------- transforms

def test_normalisation_and_inversion():
    p = np.array([[0.0, 0.25, 1.0]], np.float32)
    x = to_model(p)
    assert x.shape == (1, 1, 3)
    np.testing.assert_allclose(x.numpy()[0], [[-1.0, -0.5, 1.0]])
    np.testing.assert_allclose(from_model(x)[0], p)
    xi = to_model(p, invert=True)
    np.testing.assert_allclose(xi.numpy()[0], [[1.0, 0.5, -1.0]])
    np.testing.assert_allclose(from_model(xi, invert=True)[0], p)
    assert from_model(torch.tensor([[3.0, -3.0]])).tolist() == [[1.0, 0.0]]


def test_resize_and_restore():
    x = to_model(np.random.default_rng(0).random((60, 50)))
    y = resize(x, 32)
    assert y.shape == (1, 32, 32)
    assert resize(y, (60, 50)).shape == (1, 60, 50)
    assert resize(x, (60, 50)) is x
    # constant images stay constant; bilinear upsampling matches OpenCV's half-pixel convention
    np.testing.assert_allclose(resize(torch.full((1, 7, 9), 0.3), 16).numpy(), 0.3, atol=1e-6)
    up = resize(torch.tensor([[[0.0, 1.0]]]), (1, 4))
    np.testing.assert_allclose(up.numpy()[0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    m = resize(torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), 4, mode="nearest")
    assert set(m.unique().tolist()) == {0.0, 1.0}


def test_unwritable_output_is_one_clear_error(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(ImageError, match=r"afile/x.png: cannot write"):
        write_png(tmp_path / "afile" / "x.png", np.zeros((4, 4), np.uint8))
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_big_endian_dicom_round_trips(tmp_path):
    """A big-endian source (pydicom's MR_small_bigendian.dcm) written back as Explicit VR Little Endian
    keeps its stored values; before the fix the bytes were written swapped (correlation 0.004)."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = get_testdata_file("MR_small_bigendian.dcm")
    im = read_image(src)
    write_dicom(tmp_path / "out.dcm", im.pixels, im)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    # its VOI window 600/1600 shows -200..1399 (pydicom's LINEAR window); values beyond are written at
    # the window's edge, which a viewer using that window shows identically (5 % of the pixels here)
    expected = np.clip(pydicom.dcmread(src).pixel_array.astype(np.int64), -200, 1399)
    np.testing.assert_array_equal(out.pixel_array.astype(np.int64), expected)


def _testdata(name):
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def test_jpeg_lossless_dicom_is_read_and_written_uncompressed(tmp_path):
    """JPEG-LL.dcm (JPEG Lossless, process 14, the usual CR/DX archive encoding) needs a decoder,
    which the requirements install (pylibjpeg + pylibjpeg-libjpeg)."""
    import pydicom

    src = _testdata("JPEG-LL.dcm")
    im = read_image(src)
    assert im.size == (1024, 256) and im.bit_depth == 16
    write_dicom(tmp_path / "out.dcm", im.pixels, im)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert out["PixelData"].VR == "OW"                 # no longer the encapsulated source's OB
    np.testing.assert_array_equal(out.pixel_array, pydicom.dcmread(src).pixel_array)


def test_derived_dicom_is_a_labelled_new_series_pointing_at_its_source(dicom_chest, tmp_path):
    import pydicom

    im = read_image(dicom_chest)
    write_dicom(tmp_path / "out.dcm", im.pixels, im, derivation="test derivation")
    src, out = pydicom.dcmread(dicom_chest), pydicom.dcmread(tmp_path / "out.dcm")
    assert out.StudyInstanceUID == src.StudyInstanceUID and out.PatientID == src.PatientID
    assert out.SOPInstanceUID != src.SOPInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.SeriesNumber == int(src.get("SeriesNumber") or 0) + 1000 and out.InstanceNumber == 1
    assert out.Manufacturer.startswith("bone-suppression toolkit") and out.SoftwareVersions
    assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"] and out.DerivationDescription == "test derivation"
    assert "not for diagnosis" in out.ImageComments and "bone suppressed" in out.SeriesDescription
    (ref,) = out.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID and ref.ReferencedSOPClassUID == src.SOPClassUID
    (code,) = out.DerivationCodeSequence
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("113062", "DCM")
    assert out.ContentDate != src.get("ContentDate")


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "JPEG-LL.dcm", "MR_small_bigendian.dcm", "CT_small.dcm", "MR_small.dcm"])
def test_derived_dicom_adds_no_error_for_dciodvfy(tmp_path, name):
    """dicom3tools' validator: the derived file has no error its source does not already have."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    src = _testdata(name)
    im = read_image(src)
    write_dicom(tmp_path / "out.dcm", im.pixels, im)

    def errors(path):
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        return {line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")}

    assert errors(tmp_path / "out.dcm") <= errors(src), errors(tmp_path / "out.dcm") - errors(src)


# ------------------------------------------------------------------------- round 3, part B

@pytest.mark.parametrize("orientation, turn", [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                               (3, lambda a: np.rot90(a, 2)), (2, np.fliplr)])
def test_exif_orientation_is_applied_on_read(tmp_path, orientation, turn):
    """Before: a JPEG with EXIF orientation 6 was read as stored, so the model saw the chest sideways
    and the output came out 90° off. Now read as a viewer shows it; written upright, without the tag."""
    upright = np.zeros((60, 40), np.uint8)
    upright[5:15, 5:35] = 255                                   # a bright bar near the top
    stored = {6: np.rot90(upright, 1), 8: np.rot90(upright, -1), 3: np.rot90(upright, 2), 2: np.fliplr(upright)}
    exif = Image.Exif()
    exif[0x0112] = orientation
    for name in ("a.jpg", "a.tif"):
        Image.fromarray(np.ascontiguousarray(stored[orientation])).save(tmp_path / name, exif=exif.tobytes(),
                                                                        **({"quality": 100} if name.endswith("jpg") else {}))
        img = read_image(tmp_path / name)
        assert img.size == (60, 40) and img.meta["exif_orientation"] == orientation
        assert np.abs(img.pixels * 255 - upright).mean() < 3, name        # upright (JPEG: lossy)
        np.testing.assert_array_equal(turn(stored[orientation]), upright)  # the tag's meaning, as a check
    write_png(tmp_path / "out.png", img.pixels)
    with Image.open(tmp_path / "out.png") as out:
        assert out.getexif().get(0x0112) is None and out.size == (40, 60)


def test_damaged_exif_orientation_is_one_clear_error(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 9
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.jpg", exif=exif.tobytes())
    with pytest.raises(ImageError, match=r"b.jpg: EXIF orientation 9 is not one of 1..8"):
        read_image(tmp_path / "b.jpg")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_signed_dicom_gets_its_modality_and_voi_lut_and_is_written_back_as_stored(tmp_path, name):
    """Before: signed 16-bit CT_small / MR_small (values 127..2191 stored as int16) were scaled to the
    declared range -32768..32767, so the model saw a flat grey (std 0.006). Now the modality LUT
    (CT_small: -1024 HU intercept) and the VOI window (MR_small: 600/1600) apply, as pydicom's
    apply_modality_lut / apply_voi_lut give them; the derived DICOM keeps int16 and BitsStored, and
    a read image written back gives its stored values (within the window)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    src = _testdata(name)
    ds = pydicom.dcmread(src)
    img = read_image(src)
    assert img.pixels.std() > 0.15 and img.pixels.max() - img.pixels.min() > 0.75
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if name == "MR_small.dcm":               # the window's output range: signed 16 bits
        expected = (shown + 32768) / 65535
    else:                                    # no VOI: the image's own range of Hounsfield units
        expected = (shown - shown.min()) / (shown.max() - shown.min())
    np.testing.assert_allclose(img.pixels, expected, atol=1e-6)
    write_dicom(tmp_path / "out.dcm", img.pixels, img)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert (out.PixelRepresentation, out.BitsStored, out.BitsAllocated) == (1, 16, 16)
    assert out.pixel_array.dtype == np.int16
    lo, hi = (-200, 1399) if name == "MR_small.dcm" else (-32768, 32767)
    np.testing.assert_array_equal(out.pixel_array, np.clip(ds.pixel_array, lo, hi))
    # a darker result goes back darker, in the modality's own units
    write_dicom(tmp_path / "dark.dcm", img.pixels * 0.5, img)
    dark = apply_modality_lut(pydicom.dcmread(tmp_path / "dark.dcm").pixel_array, ds)
    assert dark.mean() < apply_modality_lut(ds.pixel_array, ds).mean()


def test_dicom_with_a_voi_lut_sequence_round_trips(dicom_chest, tmp_path):
    """RG1_UNCR with its window replaced by a VOI LUT Sequence (a gamma-like table over the stored
    range): read through the table, written back through its inverse within one LUT step."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_voi_lut

    ds = pydicom.dcmread(dicom_chest)
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", [int(round(65535 * (i / 4095) ** 0.5)) for i in range(4096)])   # LUTData
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut.dcm")
    img = read_image(tmp_path / "lut.dcm")
    assert img.meta["display"] == "VOI LUT"
    ds = pydicom.dcmread(tmp_path / "lut.dcm")
    np.testing.assert_allclose(img.pixels, 1 - apply_voi_lut(ds.pixel_array, ds) / 65535, atol=1e-6)
    write_dicom(tmp_path / "out.dcm", img.pixels, img)
    back = pydicom.dcmread(tmp_path / "out.dcm").pixel_array.astype(np.int64)
    src = np.minimum(ds.pixel_array.astype(np.int64), 4095)       # the table ends at 4095: white beyond
    inside = ds.pixel_array < 4095
    np.testing.assert_array_equal(back[inside], src[inside])


def test_full_disk_while_writing_a_dicom_is_one_line_with_its_errno(tmp_path, monkeypatch):
    """Before: pydicom re-raises an element's OSError as a new OSError whose message holds the whole
    traceback, and that went into the error. Now one line, and ENOSPC is recognised as a full disk."""
    import errno

    import pydicom.filewriter

    img = read_image(_testdata("CT_small.dcm"))
    _, param = pydicom.filewriter.writers["OW"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(pydicom.filewriter.writers, "OW", (full, param))
    with pytest.raises(ImageError) as caught:
        write_dicom(tmp_path / "out.dcm", img.pixels, img)
    assert str(caught.value) == f"{tmp_path / 'out.dcm'}: cannot write (No space left on device)"
    assert caught.value.disk_full and not list(tmp_path.iterdir())        # no partial file left


def test_derived_dicom_takes_missing_sop_uids_from_the_file_meta_or_refuses(tmp_path):
    """A source without SOPClassUID: the file meta's Media Storage SOP Class UID stands in; without
    either, the derived DICOM is refused in one line naming the attribute (before: AttributeError)."""
    import pydicom

    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    del ds.SOPClassUID
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=False)
    img = read_image(tmp_path / "a.dcm")
    write_dicom(tmp_path / "out.dcm", img.pixels, img)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == out.SourceImageSequence[0].ReferencedSOPClassUID
    del img.dicom.file_meta.MediaStorageSOPClassUID
    with pytest.raises(ImageError, match=r"b.dcm: derived DICOM not written: the source .*a.dcm has no SOPClassUID"):
        write_dicom(tmp_path / "b.dcm", img.pixels, img)
    assert not (tmp_path / "b.dcm").exists()
