"""Image I/O: 8/16-bit PNG, JPEG, TIFF and DICOM in, 8/16-bit PNG (and DICOM) out.

Every reader returns an :class:`XrayImage`: a float32 array in [0, 1] of shape (H, W) at the file's
native size, plus what is needed to write a result back the way it came (bit depth, the pydicom
dataset). Display convention is the one the models are trained on: bones bright, air dark. DICOM
MONOCHROME1 (air bright) is therefore inverted on read and re-inverted on write.

Every failure is an :class:`ImageError` whose message starts with the file path and says what is
wrong, in one line. Writers go through a temporary file in the target folder and ``os.replace`` so
that a crash never leaves a half-written image, and they never write onto one of their inputs.
"""
from __future__ import annotations

import errno
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from utils.atomic import OverwriteInputError, atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_EXTENSIONS = (".dcm", ".dicom")
DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; a decompression-bomb guard, configurable per call
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ImageError(ValueError):
    """An image file cannot be used; ``str(err)`` is one line that names the file.

    ``errno`` is the operating system's error number when a write failed with one (ENOSPC for a
    full disk), so that a caller can tell a failure of one file from one that stops every file.
    """

    def __init__(self, path: str | os.PathLike, reason: str, errno: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.errno = errno
        super().__init__(f"{self.path}: {reason}")

    @property
    def disk_full(self) -> bool:
        """The write failed because the disk (or the user's quota) is full: no later write can succeed."""
        return self.errno in DISK_FULL


@dataclass
class XrayImage:
    """A grayscale radiograph as read from disk.

    Attributes:
        pixels: float32 (H, W) in [0, 1]; 0 = black. For integer files, value / (2**bits - 1).
        bit_depth: bits per sample of the source (8, 16, or DICOM BitsStored).
        path: the source file.
        dicom: the pydicom Dataset (without pixel data decoded twice) for DICOM sources, else None.
        meta: free-form facts about the source (mode, photometric interpretation, value range).
    """

    pixels: np.ndarray
    bit_depth: int
    path: str
    dicom: Any = None
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the source image."""
        return tuple(self.pixels.shape)  # type: ignore[return-value]


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def unusable_entry(p: Path) -> str | None:
    """Why a folder entry that would be taken for an image cannot be read, or None.

    Listing by name alone would pass over these without a word: a symbolic link to nothing (dangling,
    or a loop), and a folder whose name ends like an image (``scan.png/``).
    """
    if p.name.startswith("."):
        return None
    if p.is_symlink() and not p.exists():
        return "a broken symbolic link (dangling or looping), ignored"
    if is_image_file(p) and p.is_dir():
        return "a folder, not an image file, ignored"
    return None


def list_images(folder: str | os.PathLike, *, must_exist: bool = False,
                problems: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The image files directly in ``folder`` (``folder/<name>``), sorted by name; hidden files skipped.

    Args:
        must_exist: a missing folder raises FileNotFoundError naming it; otherwise it lists as [].
        problems: if given, receives ``(path, why)`` for every other entry a reader should hear about,
            in listing order: a file that is not an image ("not an image file (ignored)"), a broken
            symbolic link or a folder named like an image (:func:`unusable_entry`), so that nothing
            is dropped silently. The caller reports them (stderr, or a scan report).
    """
    d = Path(folder)
    if not d.is_dir():
        if must_exist:
            raise FileNotFoundError(f"{d}: input folder not found")
        return []
    images = []
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            if is_image_file(p):
                images.append(p)
            elif problems is not None:
                problems.append((p, "not an image file (ignored)"))
        elif problems is not None and unusable_entry(p):
            problems.append((p, unusable_entry(p)))
    return images


def input_images(folder: str | os.PathLike, prog: str) -> list[Path]:
    """The images of an input folder given on a command line (:func:`list_images`, which must exist);
    every other entry is named on stderr as ``prog: path: why``, not silently dropped."""
    skipped: list[tuple[Path, str]] = []
    paths = list_images(folder, must_exist=True, problems=skipped)
    for path, why in skipped:
        print(f"{prog}: {path}: {why}", file=sys.stderr)
    return paths


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               allow_color: bool = False) -> XrayImage:
    """Read a grayscale radiograph into float32 [0, 1].

    Args:
        path: PNG (8/16-bit), JPEG, TIFF (8/16-bit) or DICOM file.
        max_pixels: refuse images with more pixels than this (None: no limit).
        allow_color: if False, an RGB(A) image whose channels differ is an error; gray stored as
            RGB (all channels equal, opaque) is always accepted, since OpenCV-based tools such as
            the reference code write their outputs that way.
    Raises:
        ImageError: missing, empty, truncated, corrupt, colour or oversized file.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(p, "file not found")
    if p.is_dir():
        raise ImageError(p, "is a directory, expected an image file")
    try:
        nbytes = p.stat().st_size
    except OSError as e:
        raise ImageError(p, f"cannot stat file ({e.strerror})") from None
    if nbytes == 0:
        raise ImageError(p, "empty file (0 bytes)")
    if is_dicom_file(p):
        image = _read_dicom(p, max_pixels)
    else:
        image = _read_pil(p, max_pixels, allow_color)
    if not np.isfinite(image.pixels).all():   # cannot come from integer files; guards future readers
        raise ImageError(p, "contains NaN or Inf values")
    return image


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as DICOM: by its extension, or by the DICM marker at byte 128."""
    p = Path(path)
    return p.suffix.lower() in DICOM_EXTENSIONS or _looks_like_dicom(p)


def _looks_like_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_pil(p: Path, max_pixels: int | None, allow_color: bool) -> XrayImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(p)
    except PermissionError:
        raise ImageError(p, "permission denied") from None
    except Image.DecompressionBombWarning:
        raise ImageError(p, "image too large (decompression-bomb guard)") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageError(p, f"not a readable image ({type(e).__name__}: {e})") from None
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageError(p, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        # A TIFF's orientation is read before load(), which applies and drops it; other formats' after
        # load(), since reading a PNG's EXIF reads the file to its end (a truncated file must fail there).
        orientation = _exif_orientation(im, p) if im.format == "TIFF" else 1
        if orientation != 1:
            # Pillow 13 memory-maps an uncompressed TIFF read by file name with the size already
            # turned for orientations 5..8, which scrambles the pixels; read through the file object
            # (no file name, no memory map) it decodes, then turns, correctly.
            im.filename = ""
        try:
            im.load()
        except Exception as e:  # truncated streams, bad CRCs, broken JPEG data
            raise ImageError(p, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
        if im.format != "TIFF":
            orientation = _exif_orientation(im, p)
        mode, fmt = im.mode, im.format
        upright = _upright(im, orientation)
        arr, bits = _pil_to_gray(upright, p, allow_color)
    scale = float(2**bits - 1)
    pixels = (arr.astype(np.float64) / scale).clip(0.0, 1.0).astype(np.float32)
    return XrayImage(pixels=pixels, bit_depth=bits, path=str(p),
                     meta={"mode": mode, "format": fmt, "exif_orientation": orientation})


EXIF_ORIENTATION = 0x0112


def _exif_orientation(im: Image.Image, p: Path) -> int:
    """The EXIF Orientation tag of an opened image (1, upright, when it has none).

    A camera or a phone stores a photographed film as it was held and says in this tag how to turn
    it (6: 90° clockwise); viewers apply it, so the pixels must be turned before the model sees them,
    or it works on a sideways chest and its output comes out turned.

    Raises:
        ImageError: a damaged EXIF block, or a value outside 1..8.
    """
    try:
        orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception as e:   # a damaged EXIF block
        raise ImageError(p, f"unreadable EXIF data ({type(e).__name__}: {e})") from None
    if orientation not in range(1, 9):
        raise ImageError(p, f"EXIF orientation {orientation} is not one of 1..8")
    return orientation


def _upright(im: Image.Image, orientation: int) -> Image.Image:
    """The loaded image as it is meant to be seen. Outputs are written upright and without the tag
    (the writers write no EXIF), so that they look the same in every viewer."""
    if orientation == 1 or EXIF_ORIENTATION not in im.getexif():   # none, or already applied by the loader
        return im
    return ImageOps.exif_transpose(im)


def _pil_to_gray(im: Image.Image, p: Path, allow_color: bool) -> tuple[np.ndarray, int]:
    """Return (integer gray array, bit depth) for every PIL mode a radiograph may come in."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8), 8
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8), 8
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, dtype=np.uint16), 16
    if mode == "I":
        # Pillow opens 16-bit PNG/TIFF as 32-bit "I"; values above 16 bits are not radiographs.
        arr = np.asarray(im, dtype=np.int64)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ImageError(p, f"32-bit integer image with values outside 0..65535 (mode {mode})")
        return arr.astype(np.uint16), 16
    if mode == "F":
        raise ImageError(p, "floating-point image (mode F): convert it to 8- or 16-bit first")
    if mode in ("P", "PA"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "LA":
        arr = np.asarray(im)
        if (arr[..., 1] != 255).any():
            raise ImageError(p, "gray image with transparency (mode LA): remove the alpha channel")
        return arr[..., 0].astype(np.uint8), 8
    if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        arr = np.asarray(im.convert("RGBA") if mode != "RGB" else im)
        if arr.shape[-1] == 4 and (arr[..., 3] != 255).any():
            raise ImageError(p, f"image with transparency (mode {im.mode}): expected an opaque grayscale image")
        rgb = arr[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0].astype(np.uint8), 8
        if not allow_color:
            raise ImageError(p, f"colour image (mode {im.mode}, channels differ): expected grayscale")
        # ITU-R 601 luma, the conversion OpenCV's BGR2GRAY uses.
        gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        return np.round(gray).astype(np.uint8), 8
    raise ImageError(p, f"unsupported image mode {mode}")


# ------------------------------------------------------------------------------------------ DICOM

def _read_dicom(p: Path, max_pixels: int | None) -> XrayImage:
    try:
        import pydicom
    except ImportError:  # pragma: no cover - pydicom is in requirements.txt
        raise ImageError(p, "reading DICOM needs pydicom (pip install pydicom)") from None
    try:
        ds = pydicom.dcmread(p)
    except Exception as e:
        raise ImageError(p, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if "PixelData" not in ds:
        raise ImageError(p, "DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if max_pixels is not None and rows * cols > max_pixels:
        raise ImageError(p, f"image of {cols}x{rows} = {rows * cols} pixels exceeds the limit of {max_pixels}")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageError(p, f"DICOM with {ds.SamplesPerPixel} samples per pixel: expected grayscale")
    try:
        stored = ds.pixel_array
    except Exception as e:  # truncated pixel data, unsupported transfer syntax
        raise ImageError(p, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    if stored.ndim != 2:
        raise ImageError(p, f"DICOM pixel array of shape {stored.shape}: expected one 2-D frame")
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(p, f"DICOM photometric interpretation {photometric}: expected MONOCHROME1/2")
    levels = _stored_levels(stored, bits, signed)
    try:
        curve, how = _display_curve(ds, levels, stored)
    except Exception as e:   # a malformed Modality or VOI LUT, a window width < 1, ...
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ImageError(p, f"cannot apply the file's modality / VOI LUT ({type(e).__name__}: {first_line})") from None
    pixels = curve[np.searchsorted(levels, stored)]
    if photometric == "MONOCHROME1":  # air bright: invert so that bones are bright, air dark
        pixels = 1.0 - pixels
    meta = {"photometric": photometric, "display": how, "levels": levels, "curve": curve,
            "signed": signed, "stored_dtype": str(stored.dtype), "stored_range": (int(levels[0]), int(levels[-1]))}
    return XrayImage(pixels=pixels.clip(0, 1).astype(np.float32), bit_depth=bits, path=str(p),
                     dicom=ds, meta=meta)


def _stored_levels(stored: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Every value the file can store (BitsStored, PixelRepresentation), sorted: at most 65,536 for
    the usual ≤ 16 bits; for deeper data only the values present, to keep the table small."""
    lo = -(2 ** (bits - 1)) if signed else 0
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    if hi - lo < 2**17:
        return np.arange(lo, hi + 1, dtype=np.int64)
    return np.unique(stored.astype(np.int64))


# The attributes pydicom's modality and VOI functions read (they convert some of them in place, so
# they get a copy of these, not the dataset that is later written back).
LUT_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
                "RescaleIntercept", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
                "VOILUTSequence")


def _display_curve(ds, levels: np.ndarray, stored: np.ndarray) -> tuple[np.ndarray, str]:
    """The [0, 1] value of each stored level, as a DICOM viewer shows the file; and how it was made.

    The Modality LUT (rescale slope / intercept, or a Modality LUT Sequence) gives the modality's
    values (e.g. Hounsfield units), then the file's first VOI window or VOI LUT what is meant to be
    seen, through pydicom's ``apply_modality_lut`` and ``apply_voi_lut``; the VOI output is scaled
    to [0, 1] over its range. Without a VOI the image's own minimum and maximum modality values are
    black and white (a viewer's default): scaling the full declared range (signed 16 bits for
    values 127..2191) would show the model a flat grey. The same curve, inverted, maps a result
    back to stored values (:func:`to_dicom_stored`).
    """
    import copy

    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    lut_ds = Dataset()
    for keyword in LUT_KEYWORDS:
        if keyword in ds:
            lut_ds[keyword] = copy.deepcopy(ds[keyword])
    if getattr(ds, "file_meta", None) is not None:
        lut_ds.file_meta = ds.file_meta       # the byte order of OW LUT data; only read
    lut_ds.set_original_encoding(*ds.original_encoding)
    values = np.asarray(apply_modality_lut(levels, lut_ds), dtype=np.float64)
    has_voi = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
    if has_voi:
        # a VOI LUT indexes by integer values; a rescale gives floats that are integers in practice
        integral = np.array_equal(values, np.round(values))
        shown = np.asarray(apply_voi_lut(values.astype(np.int64) if integral else values, lut_ds), dtype=np.float64)
        lo, hi = shown.min(), shown.max()
        how = "VOI LUT" if ds.get("VOILUTSequence") else f"VOI window {ds['WindowCenter'].value}/{ds['WindowWidth'].value}"
    else:
        shown = values
        present = values[np.searchsorted(levels, stored)]
        lo, hi = present.min(), present.max()
        if hi <= lo:                         # a flat image: its declared range, not a division by zero
            lo, hi = values.min(), values.max()
        how = "the image's modality minimum and maximum (no VOI in the file)"
    curve = (shown - lo) / (hi - lo) if hi > lo else np.zeros_like(shown)
    return np.clip(curve, 0.0, 1.0), how


def to_dicom_stored(pixels: np.ndarray, image: XrayImage) -> np.ndarray:
    """Map [0, 1] display pixels back to stored values of ``image``'s DICOM encoding (its pixel
    representation, bits and byte order) through the inverse of the read's display curve.

    Within the VOI window the map is exact (a read image written back gives its stored values); a
    value the window clips (above or below it) is written at the window's edge, which a viewer using
    the file's window shows identically.
    """
    x = np.clip(np.nan_to_num(pixels.astype(np.float64), nan=0.0), 0.0, 1.0)
    if image.meta["photometric"] == "MONOCHROME1":
        x = 1.0 - x
    xp, fp = _inverse_curve(image.meta["curve"], image.meta["levels"])
    lo, hi = image.meta["stored_range"]
    stored = np.clip(np.round(np.interp(x, xp, fp)), lo, hi)
    # Little-endian, as the Explicit VR Little Endian file it goes into: a big-endian source's
    # pixel_array has a '>' dtype whose bytes would otherwise be written swapped.
    return stored.astype(np.dtype(image.meta["stored_dtype"]).newbyteorder("<"))


def _inverse_curve(curve: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(display values increasing, stored level for each) to interpolate the inverse of ``curve``.

    A monotone curve is cut to its rising part, from the last level at its minimum to the first at
    its maximum (the window's edges), so that black and white go back to the window's edges and not
    to the ends of the stored range; a level run that shows one value (a VOI LUT's step) is its
    mean. A curve that is not monotone (a strange LUT) is inverted by sorting, run means likewise.
    """
    c, lv = curve, levels.astype(np.float64)
    if c[-1] < c[0]:                         # falling (a negative rescale slope): read it backwards
        c, lv = c[::-1], lv[::-1]
    if np.all(np.diff(c) >= 0):
        start, end = np.flatnonzero(c == c[0])[-1], np.flatnonzero(c == c[-1])[0]
        c, lv = c[start:end + 1], lv[start:end + 1]
    values, run = np.unique(c, return_inverse=True)
    return values, np.bincount(run, weights=lv) / np.bincount(run)


SOFTWARE = "bone-suppression toolkit (BS-LDM / GL-LCM re-implementation)"


def write_dicom(path: str | os.PathLike, pixels: np.ndarray, like: XrayImage,
                description: str = "bone suppressed (soft tissue)", subtraction: bool = True,
                derivation: str = "") -> None:
    """Write ``pixels`` (float [0, 1], same (H, W) as ``like``) as a derived DICOM instance of the same study.

    Patient and study stay; the result is a new series of one instance (new SOP and series UIDs, a
    series number of the source's + 1000, instance number 1, content date and time of now) made by
    this software (Manufacturer, Software Versions), labelled as processed (Series Description,
    Derivation Description, Image Comments, Image Type DERIVED\\SECONDARY), pointing at its source
    (Source Image Sequence) and, when the soft tissue is the input minus a predicted bone layer
    (``subtraction``), coded as DCM 113062 "Pixel by pixel subtraction" (Derivation Code Sequence).
    The pixels keep the source's bit depth, rescale and photometric interpretation and are written
    uncompressed (Explicit VR Little Endian) through pydicom's ``set_pixel_data``, which also sets
    the pixel attributes and the Pixel Data VR, whatever the source's transfer syntax.
    """
    import copy
    import datetime

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if like.dicom is None:
        raise ImageError(path, "write_dicom needs a DICOM source image to copy the header from")
    if pixels.shape != like.size:
        raise ImageError(path, f"pixels of shape {pixels.shape} do not match the source size {like.size}")
    src = like.dicom
    sop_class, _ = _source_uids(like, path)     # before any work: a header without them is refused
    ds = copy.deepcopy(src)
    ds.SOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(to_dicom_stored(pixels, like), photometric_interpretation=str(src.PhotometricInterpretation),
                      bits_stored=int(src.get("BitsStored", 8 * like.dicom.pixel_array.dtype.itemsize)))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(src.get("SeriesNumber") or 0) + 1000
    ds.InstanceNumber = 1
    now = datetime.datetime.now()
    ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Manufacturer = SOFTWARE
    ds.SoftwareVersions = "1"
    ds.SeriesDescription = description
    # value 3 onwards (e.g. the MR image's required third value) describe the image: keep them
    ds.ImageType = ["DERIVED", "SECONDARY", *list(src.get("ImageType", []))[2:]]
    ds.DerivationDescription = (derivation or "Bone suppression (soft-tissue image) generated by a latent "
                                "diffusion model; research use, not for diagnosis")[:1024]
    ds.ImageComments = "PROCESSED: bone-suppressed soft-tissue image, research use only, not for diagnosis"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = _source_uids(like, path)
    ds.SourceImageSequence = [ref]
    if subtraction:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113062", "DCM", "Pixel by pixel subtraction"
        ds.DerivationCodeSequence = [code]
    elif "DerivationCodeSequence" in ds:
        del ds.DerivationCodeSequence
    _write_checked(path, lambda tmp: pydicom.dcmwrite(tmp, ds, enforce_file_format=True), like.path)


def _source_uids(like: XrayImage, path: str | os.PathLike) -> tuple[str, str]:
    """The source's SOP Class and SOP Instance UIDs, which the derived image copies and points at:
    from the dataset, else from its file meta information (Media Storage SOP Class / Instance UID).

    Raises:
        ImageError: naming the output and the missing attribute (the source is not a complete
            DICOM instance; its PNG output is unaffected).
    """
    src, meta = like.dicom, getattr(like.dicom, "file_meta", None)
    found = []
    for own, stored in (("SOPClassUID", "MediaStorageSOPClassUID"),
                        ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        uid = src.get(own) or (meta.get(stored) if meta is not None else None)
        if not uid:
            raise ImageError(path, f"derived DICOM not written: the source {like.path} has no {own} "
                             f"(nor {stored} in its file meta information)")
        found.append(str(uid))
    return found[0], found[1]


# ------------------------------------------------------------------------------------------- PNG

def to_uint(pixels: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float [0, 1] -> uint8/uint16 with clipping and rounding (the reference truncated, §7.17)."""
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    scale = 2**bit_depth - 1
    out = np.round(np.clip(np.nan_to_num(pixels.astype(np.float64), nan=0.0), 0.0, 1.0) * scale)
    return out.astype(np.uint8 if bit_depth == 8 else np.uint16)


def write_png(path: str | os.PathLike, pixels: np.ndarray, bit_depth: int | None = None,
              inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Write a grayscale PNG atomically (temporary file in the same folder, then rename).

    Args:
        pixels: (H, W) array. uint8 / uint16 are written as they are; float arrays are taken as
            [0, 1], clipped, rounded and written with ``bit_depth`` bits (default 8). bool -> 0/255.
        bit_depth: 8 or 16 for float input; must agree with the dtype of integer input.
        inputs: paths this output must never overwrite (the images it was computed from).
    """
    # Pillow writes "I;16" as a 16-bit grayscale PNG; "L" as 8-bit.
    im = Image.fromarray(_gray_array(path, pixels, bit_depth))
    _write_checked(path, lambda tmp: im.save(tmp, format="PNG"), *inputs)


def _gray_array(path: str | os.PathLike, pixels: np.ndarray, bit_depth: int | None) -> np.ndarray:
    """The uint8 / little-endian uint16 array a writer saves (see :func:`write_png` for the rules)."""
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a (H, W) array, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        if bit_depth not in (None, 8):
            raise ValueError(f"{path}: uint8 pixels but bit_depth={bit_depth}")
    elif arr.dtype == np.uint16:
        if bit_depth not in (None, 16):
            raise ValueError(f"{path}: uint16 pixels but bit_depth={bit_depth}")
    elif np.issubdtype(arr.dtype, np.floating):
        arr = to_uint(arr, bit_depth or 8)
    else:
        raise ValueError(f"{path}: unsupported pixel dtype {arr.dtype}")
    return arr if arr.dtype == np.uint8 else arr.astype("<u2")


# Output formats by input format: the output's name and content always agree. PNG and TIFF inputs get
# their own name and format (both lossless, 8 or 16 bits); JPEG inputs a PNG (a second lossy
# compression would add its artefacts to the result, and JPEG has no 16 bits); DICOM inputs a PNG
# (ldm_eval.py also writes a derived DICOM beside it).
TIFF_EXTENSIONS = (".tif", ".tiff")
SAME_FORMAT_EXTENSIONS = (".png", *TIFF_EXTENSIONS)


def output_name(path: str | os.PathLike) -> str:
    """The name of the image an evaluation writes for input ``path``: the same name for PNG and TIFF
    inputs (written in that format), ``<stem>.png`` for JPEG and DICOM inputs."""
    p = Path(path)
    return p.name if p.suffix.lower() in SAME_FORMAT_EXTENSIONS else p.stem + ".png"


def check_output_names(paths: list[Path]) -> None:
    """Refuse, before any work, inputs whose outputs would overwrite each other (``x.png``, ``x.jpg``
    and ``x.dcm`` all give ``x.png``); inputs of different folders are compared by their folder too.

    Raises:
        ValueError: naming both inputs and the output name.
    """
    seen: dict[tuple[Path, str], Path] = {}
    for p in paths:
        key = (Path(p).parent, output_name(p).lower())
        if key in seen:
            raise ValueError(f"{seen[key]} and {p} would both be written as {output_name(p)}; rename one of them or "
                             "process them in separate runs")
        seen[key] = p


def write_image(path: str | os.PathLike, pixels: np.ndarray, bit_depth: int | None = None,
                inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Write a grayscale image in the format its name says: TIFF for ``.tif``/``.tiff``, PNG for
    ``.png`` (same arguments as :func:`write_png`); any other name is refused, so that a name never
    announces a format its bytes are not in.

    Raises:
        ImageError: a name of another format, or the write failed.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        write_png(path, pixels, bit_depth, inputs)
    elif suffix in TIFF_EXTENSIONS:
        write_tiff(path, pixels, bit_depth, inputs)
    else:
        raise ImageError(path, f"cannot write an image named {suffix or 'without extension'}: "
                         "outputs are PNG (.png) or TIFF (.tif, .tiff)")


def write_tiff(path: str | os.PathLike, pixels: np.ndarray, bit_depth: int | None = None,
               inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Write an uncompressed grayscale TIFF (8 or 16 bits) atomically; arguments as :func:`write_png`."""
    im = Image.fromarray(_gray_array(path, pixels, bit_depth))
    _write_checked(path, lambda tmp: im.save(tmp, format="TIFF"), *inputs)


def _write_checked(path: str | os.PathLike, write: Callable[[str], Any], *inputs: str | os.PathLike) -> None:
    """Atomic write whose failures are :class:`ImageError` naming the output file, in one line.

    Any failure of the writer becomes one: an image failure must stay that image's (a batch goes
    on), and a message must stay one line, while pydicom re-raises an error inside an element as
    the same type with a whole traceback in its message. The operating-system error underneath,
    found through the exception chain, gives the reason and ``errno`` (a full disk stops a batch).
    """
    try:
        atomic_write(path, write, *inputs)
    except OverwriteInputError:
        raise ImageError(path, "refusing to overwrite an input file with an output") from None
    except Exception as e:   # read-only or full disk, a folder at the name, a header pydicom cannot write
        cause = _os_cause(e)
        if cause is not None and cause.strerror:
            raise ImageError(path, f"cannot write ({cause.strerror})", errno=cause.errno) from None
        first_line = (str(e).strip().splitlines() or [""])[0]
        what = first_line if isinstance(e, OSError) else f"{type(e).__name__}: {first_line}"
        raise ImageError(path, f"cannot write ({what})") from None


def _os_cause(err: BaseException) -> OSError | None:
    """The first OSError with an error number in ``err``'s chain (itself, its cause, its context)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
    return None
