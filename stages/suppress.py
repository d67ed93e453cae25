"""Stage 3 as a library: bone suppression of a split or a folder of radiographs (what ``ldm_eval.py`` runs).

:func:`suppress_images` runs it; :func:`build_parser` and :func:`config_for` are ``ldm_eval.py``'s command
line, which :func:`eval_config` also serves for callers with ``key=value`` overrides (``demo.py``, the tools).

Each CXR is read at native size (PNG 8/16-bit, JPEG, TIFF, DICOM) and run through
``models.pipeline.BoneSuppressor``: resized to the model size, VQ-encoded, sampled with ``sampler.*``
(temporal adaptive thresholding r_j = r0 + κ·j when ``sampler.clip``), decoded, and brought back to
native size (``output.mode``). With ``global_local.enabled`` (GL-LCM) a second, local path is
conditioned on the lung-masked CXR, guided by Local-Enhanced Guidance (``global_local.leg_mode``,
``alpha``), sampled in the same batched UNet calls, and fused into the global result inside the
lungs (``global_local.fusion``: poisson | alpha | none). Lung masks come from ``--masks DIR``
(default ``<data.root>/Mask`` for a split) or from the built-in segmenter
(``--set global_local.masks=auto``); ``--global-only`` switches the local path off.

Outputs: ``<out>/<name>`` with the input's size and bit depth; its name and format agree
(``data.io.output_name``): a PNG or TIFF input gives a PNG or TIFF of its own name, a JPEG or DICOM
input ``<stem>.png`` (a DICOM input also gets a derived DICOM of the same study, in the source's
pixel representation); ``--save-paths`` adds the model-size global, local and fused images. The EMA
weights are used unless ``--weights raw``. Each image's noise comes from its own generators, seeded
by ``sampler.seed`` and the file name, so the same checkpoint, config and seed give the same image
whatever the batch or the order. Finished outputs are skipped (resumable; ``--overwrite`` redoes
them); the output folder may not be an input folder (by any path to it). A bad file, or an output
that cannot be written (a folder or a symbolic link at its name, a header pydicom cannot write), is
that image's failure, reported in one line, and the others go on; a full disk stops the run: what
was written stays and is counted (``not_processed``, ``stopped`` in ``timing.json``), exit status 3.
Exit status 1 when an image failed, except under ``torchrun``, where every process exits 0 and the
failures are in the last line and ``timing.json`` (a non-zero process makes the launcher report a
crash). Precision and layout come from ``inference`` (``--precision``:
``auto`` runs bf16 on CUDA and on CPUs where it is measured faster, see ``models/precision.py``);
with ``inference.local_crop`` the local path encodes and decodes only the lungs' box. Under
``torchrun`` the sorted images are dealt out to the processes (GPUs, or CPU processes sharing the
cores), each resumable on its own, with one summary at the end. ``timing.json`` splits the time per image into encoding, sampling,
decoding and fusion, and holds the config the run used (``config``: the given one with the model's
``data.image_size`` and ``data.invert``). Default output: ``<run>/eval/<split>/`` (for a converted or released model,
``eval/<split>/`` beside it).

Score the outputs with ``metrics.py --cxr ROOT/CXR --gt ROOT/BS --pred OUT --list LIST``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data.datasets import CXR, MASK, split_list
from data.io import (DICOM_EXTENSIONS, ImageError, check_output_names, input_images, is_dicom_file, output_name,
                     read_image, write_dicom, write_image)
from data.masking import load_mask
from models import load_ldm, load_vqgan
from models.checkpoints import checkpoint_config, fixed_by_checkpoint
from models.pipeline import BoneSuppressor, derivation_text
from models.precision import prepare_for_inference
from models.schedule import build_schedule
from utils.atomic import atomic_write_text, json_text, refuse_input_folders, require_writable
from utils.checkpoint import CheckpointError, resolve_first_stage
from utils.config import Config, ConfigError, config_to_dict
from utils.cli import eval_parser, naming_file, positive_int
from utils.dist import cleanup_distributed, setup_distributed

STAGE = "ldm"
PATH_PARTS = ("global", "local", "fused")   # the --save-paths images, each under <out>/paths/<part>/


def resolve_config(cfg: Config, train_cfg: Config) -> Config:
    """The config an evaluation runs with: ``cfg`` with the model's own size and intensity convention
    (``data.image_size``, ``data.invert`` of its training config ``train_cfg``); sampling, guidance,
    fusion and output stay as ``cfg`` gives them. A new object; ``cfg`` is not changed, and resolving
    a resolved config gives it back."""
    data = dataclasses.replace(cfg.data, image_size=train_cfg.data.image_size, invert=train_cfg.data.invert)
    return dataclasses.replace(cfg, data=data)


def image_jobs(cfg: Config, split: str | None, input_dir: str | None) -> list[Path]:
    """Source CXR paths: a split's CXR/ images or every image of a folder (the other entries of the
    folder are named on stderr, not silently dropped)."""
    if input_dir is not None:
        return input_images(input_dir, "ldm_eval.py")
    root = Path(cfg.data.root)
    return [root / CXR / n for n in split_list(cfg.data, split)]


def dicom_output_name(path: Path) -> str:
    """Name of the derived DICOM written for a DICOM input: its own name, or ``<stem>.dcm`` for a DICOM
    file named otherwise (``scan.png`` holding DICOM must not have its PNG output replaced)."""
    return path.name if path.suffix.lower() in DICOM_EXTENSIONS else path.stem + ".dcm"


def output_files(out_dir: Path, src: Path, save_paths: bool) -> list[Path]:
    """Every file a source may give: the image, a derived DICOM, and the ``paths/`` images."""
    files = [out_dir / output_name(src), *([out_dir / dicom_output_name(src)] if is_dicom_file(src) else [])]
    if save_paths:
        files += [out_dir / "paths" / part / output_name(src) for part in PATH_PARTS]
    return files


def blocked_output(out_dir: Path, src: Path, save_paths: bool) -> str | None:
    """Why ``src``'s outputs cannot be written, or None: a name taken by something this run must not
    replace or write through (a folder, a symbolic link, a device). Checked before the image is
    processed, so that it fails alone and costs nothing; a symbolic link is never taken for a
    finished output."""
    for f in output_files(out_dir, src, save_paths):
        if f.is_symlink():
            return f"{f}: the output's name is a symbolic link; not written through (remove the link)"
        if f.exists() and not f.is_file():
            return f"{f}: the output's name is taken by a folder or another non-file; not replaced"
    return None


def finished(out_dir: Path, src: Path) -> bool:
    """``src``'s output exists as a regular file (a resumed run skips it); a link does not count."""
    out = out_dir / output_name(src)
    return out.is_file() and not out.is_symlink()


def check_paths_folder(out_dir: Path) -> None:
    """Refuse, before any work, a symbolic link planted at ``<out>/paths`` or a folder under it
    (--save-paths would write through it, outside the output folder)."""
    for d in (out_dir / "paths", *(out_dir / "paths" / part for part in PATH_PARTS)):
        if d.is_symlink():
            raise ValueError(f"{d}: is a symbolic link; --save-paths does not write through links "
                             "(remove it or choose another --out)")


def first_stage(ckpt: str | Path, cfg: Config, train_cfg: Config) -> Path:
    """The VQGAN file: ``ldm_train.vqgan_ckpt`` as given for this evaluation if it was changed (from the
    working directory), else the checkpoint's own (found beside it or from the working directory)."""
    given = cfg.ldm_train.vqgan_ckpt
    if given and given != train_cfg.ldm_train.vqgan_ckpt:
        if not Path(given).is_file():
            raise CheckpointError(f"ldm_train.vqgan_ckpt={given}: file not found")
        return Path(given)
    return resolve_first_stage(ckpt, train_cfg.ldm_train.vqgan_ckpt)


def write_result(out_dir: Path, im, res, output_mode: str, derivation: str, save_paths: bool) -> None:
    """One image's outputs: the image in its input's format (16-bit for a deeper input; a PNG for
    DICOM and JPEG inputs, :func:`data.io.output_name`), a derived DICOM for a DICOM input, and with
    ``save_paths`` the global / local / fused images under ``paths/``. The image comes last: its
    presence marks the source as done for a resumed run.

    Raises:
        ImageError: a write failed (its ``disk_full`` says whether later writes can succeed).
    """
    src = Path(im.path)
    if im.dicom is not None:
        write_dicom(out_dir / dicom_output_name(src), res.soft, im, subtraction=output_mode == "native_residual",
                    derivation=derivation)
    if save_paths:
        for part, img in zip(PATH_PARTS, (res.global_img, res.local_img, res.fused)):
            if img is not None:
                write_image(out_dir / "paths" / part / output_name(src), img)
    write_image(out_dir / output_name(src), res.soft, bit_depth=16 if im.bit_depth > 8 else 8, inputs=(src,))


def merge_counts(parts: list[dict]) -> dict:
    """The per-process counts of a sharded run as one (images, written, skipped, failures, seconds)."""
    return {"images": sum(c["images"] for c in parts), "written": sum(c["written"] for c in parts),
            "skipped_existing": sum(c["skipped_existing"] for c in parts),
            "failures": [f for c in parts for f in c["failures"]],
            "not_processed": sum(c["not_processed"] for c in parts),
            "stopped": next((c["stopped"] for c in parts if c["stopped"]), None),
            "seconds": {k: sum(c["seconds"][k] for c in parts) for k in parts[0]["seconds"]}}


def suppress_images(cfg: Config, ckpt: str | Path, split: str | None = "test", input_dir: str | None = None,
                    out_dir: str | Path | None = None, weights: str = "ema", batch_size: int = 4,
                    overwrite: bool = False, masks_dir: str | None = None, save_paths: bool = False,
                    progress: bool = True) -> dict:
    """Suppress bones in every job image; return the summary (also written as timing.json).

    ``cfg`` is not changed: the run uses :func:`resolve_config` of it (the model's size and intensity
    convention), and the summary's ``config`` is that config. Under ``torchrun --nproc_per_node N``
    each process takes every N-th image of the sorted job list (its own GPU, or an equal share of the
    CPU cores), and the summaries are merged into one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    info = setup_distributed(cfg.run.device)
    device = info.device
    if info.distributed and device.type == "cpu":
        # torchrun sets one thread per process; give each process its share of the cores instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))))
    jobs = image_jobs(cfg, split, input_dir)
    if not jobs:
        raise ValueError(f"no images to process ({input_dir or split})")
    check_output_names(jobs)
    home = Path(ckpt).resolve().parent          # a run's checkpoints/ folder, or a converted/released model's
    home = home.parent if home.name == "checkpoints" else home
    out_dir = Path(out_dir) if out_dir else home / "eval" / (Path(input_dir).name if input_dir else split)
    refuse_input_folders([out_dir], sorted({p.parent for p in jobs}))
    require_writable(out_dir)
    if save_paths:
        check_paths_folder(out_dir)
    unet, train_cfg = load_ldm(ckpt, device, weights)
    vqgan, _ = load_vqgan(first_stage(ckpt, cfg, train_cfg), device)
    unet, vqgan, arithmetic = prepare_for_inference(unet, vqgan, cfg.inference, device)
    if progress and info.is_main:
        print(f"ldm_eval.py: {arithmetic}", file=sys.stderr)
    cfg = resolve_config(cfg, train_cfg)       # from here on, only the config this run uses
    suppressor = BoneSuppressor(unet, vqgan, build_schedule(train_cfg.diffusion), cfg, train_cfg.diffusion.cond_mode)
    gl = cfg.global_local
    auto = gl.enabled and gl.masks == "auto"
    mask_dir = Path(masks_dir) if masks_dir else (Path(cfg.data.root) / MASK if input_dir is None else None)
    jobs = jobs[info.rank::info.world_size]          # this process's share (all of it on one process)
    failures, done, stopped = [], 0, None
    for path in jobs:                                # outputs that cannot be written fail before any work
        why = blocked_output(out_dir, path, save_paths)
        if why:
            failures.append({"name": path.name, "error": why})
            print(f"ldm_eval.py: {why}", file=sys.stderr)
    blocked = {f["name"] for f in failures}
    skipped = [p for p in jobs if p.name not in blocked and not overwrite and finished(out_dir, p)]
    jobs = [p for p in jobs if p.name not in blocked and p not in skipped]
    derivation = derivation_text(cfg, ckpt)
    bar = tqdm(total=len(jobs), desc=f"bone suppression{f' (rank {info.rank})' if info.distributed else ''}",
               disable=not progress, position=info.rank)
    processed = 0
    for start in range(0, len(jobs), batch_size):
        batch = []
        for path in jobs[start:start + batch_size]:
            try:
                im = read_image(path, cfg.data.max_pixels)
                mask = load_mask(path, mask_dir, im.pixels, auto, cfg.data.max_pixels) if gl.enabled else None
                batch.append((im, mask))
            except (ImageError, ValueError) as e:   # unreadable image, missing mask, no lungs found
                msg = naming_file(path, e)
                failures.append({"name": path.name, "error": msg})
                print(f"ldm_eval.py: {msg}", file=sys.stderr)
        processed += len(jobs[start:start + batch_size])
        bar.update(len(jobs[start:start + batch_size]) - len(batch))
        if not batch:
            continue
        results = suppressor([im.pixels for im, _ in batch], [m for _, m in batch],
                             [Path(im.path).name for im, _ in batch], progress=progress)
        for (im, _), res in zip(batch, results):
            try:
                write_result(out_dir, im, res, cfg.output.mode, derivation, save_paths)
                done += 1
            except ImageError as e:              # this image's failure: the others go on
                failures.append({"name": Path(im.path).name, "error": str(e)})
                print(f"ldm_eval.py: {e}", file=sys.stderr)
                if e.disk_full:                  # ... unless no write can succeed any more
                    stopped = f"disk full: {e}"
        bar.update(len(batch))
        if stopped:
            break
    bar.close()
    counts = {"images": len(jobs) + len(skipped) + len(blocked), "written": done, "skipped_existing": len(skipped),
              "failures": failures, "not_processed": len(jobs) - processed, "stopped": stopped,
              "seconds": dict(suppressor.times)}
    if info.distributed:                           # one summary for the whole run
        parts: list = [None] * info.world_size
        torch.distributed.all_gather_object(parts, counts)
        counts = merge_counts(parts)
        cleanup_distributed()
    done, failures, skipped_n = counts["written"], counts["failures"], counts["skipped_existing"]
    per = {k: v / max(done, 1) for k, v in counts["seconds"].items()}
    summary = {"checkpoint": str(ckpt), "weights": weights, "images": counts["images"], "written": done,
               "skipped_existing": skipped_n, "failures": failures, "not_processed": counts["not_processed"],
               "stopped": counts["stopped"], "processes": info.world_size,
               "sampler": {"name": cfg.sampler.name, "steps": cfg.sampler.steps, "clip": cfg.sampler.clip,
                           "r0_global": cfg.sampler.clip_r0_global, "r0_local": cfg.sampler.clip_r0_local,
                           "kappa": cfg.sampler.clip_kappa, "seed": cfg.sampler.seed},
               "global_local": {"enabled": gl.enabled, "leg_mode": gl.leg_mode, "alpha": gl.alpha,
                                "fusion": gl.fusion, "masks": gl.masks},
               "output_mode": cfg.output.mode, "inference": arithmetic, "seconds_per_image": per,
               "config": config_to_dict(cfg)}
    if not info.is_main:
        return summary
    if done or not skipped_n:   # a run that only found finished outputs keeps the timing of the run that made them
        write_summary(out_dir / "timing.json", summary)
    left = f", {summary['not_processed']} not processed" if summary["not_processed"] else ""
    print(f"{done} of {counts['images'] - skipped_n} images written, {skipped_n} already done, {len(failures)} failed"
          f"{left}"
          f"{f' ({info.world_size} processes)' if info.distributed else ''} -> {out_dir}"
          f" | s/image: encode {per['encode']:.3f}, sample {per['sample']:.3f} ({cfg.sampler.name} x"
          f"{cfg.sampler.steps}, {'global+local' if gl.enabled else 'global'}), decode {per['decode']:.3f}, "
          f"fusion {per['fusion']:.3f}")
    if summary["stopped"]:
        print(f"ldm_eval.py: stopped, {summary['stopped']}; the {done} outputs written are kept. Free space and "
              "run the same command again: finished outputs are skipped", file=sys.stderr)
    return summary


def write_summary(path: Path, summary: dict) -> None:
    """``timing.json``; a run stopped by a full disk may not manage it either: it says so in one line and
    records the stop in the summary it returns (the outputs already written stay)."""
    try:
        atomic_write_text(path, json_text(summary, indent=2) + "\n")
    except OSError as e:
        print(f"ldm_eval.py: {path}: not written ({e.strerror or e})", file=sys.stderr)
        summary["stopped"] = summary["stopped"] or f"{path}: not written ({e.strerror or e})"


def exit_status(summary: dict, distributed: bool) -> int:
    """The process's exit status: 3 when the run stopped (full disk), 1 when an image failed, else 0.

    Under ``torchrun`` a failed image gives 0 from every process: the launcher reports any non-zero
    exit as a crash of the whole job, with its own traceback, while the failures are listed in the
    final line and in ``timing.json``; a stopped run exits 3 from every process, deliberately.
    """
    if summary["stopped"]:
        return 3
    return 1 if summary["failures"] and not distributed else 0


def eval_config(ckpt: str | Path, overrides: list[str] | tuple[str, ...] = (), config_files: list | None = None):
    """The config to evaluate ``ckpt`` with: its own (or ``config_files``) with ``overrides``
    (``key=value``, later ones win).

    Raises:
        ConfigError: an override changes a key the checkpoint fixed (:func:`fixed_by_checkpoint`) to a
            value other than the trained one.
    """
    cfg = checkpoint_config(ckpt, STAGE, config_files, list(overrides))
    fixed = [o for o in overrides if fixed_by_checkpoint(o.split("=", 1)[0].strip())]
    if fixed:
        trained = checkpoint_config(ckpt, STAGE)
        for item in fixed:
            key = item.split("=", 1)[0].strip()
            if _get(cfg, key) != _get(trained, key):
                raise ConfigError(f"--set {item}: {key} is fixed by the checkpoint (trained with "
                                  f"{_get(trained, key)!r}); evaluation cannot change it")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = eval_parser("Bone suppression with a trained latent diffusion model.",
                         "stage-2 checkpoint (step_*.pt or best.pt)", "a folder of CXR images (PNG, JPEG, TIFF, DICOM)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "lcm"], help="override sampler.name")
    parser.add_argument("--steps", type=int, help="override sampler.steps")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    parser.add_argument("--masks", dest="masks_dir", help="folder of lung masks (default <data.root>/Mask for a "
                        "split); or --set global_local.masks=auto for the built-in segmenter")
    parser.add_argument("--global-only", action="store_true", help="global path only (no masks, no fusion)")
    parser.add_argument("--save-paths", action="store_true",
                        help="also write the model-size global, local and fused images under <out>/paths/")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per batch (>= 1)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="override inference.precision (auto: bf16 on CUDA and on CPUs measured faster)")
    parser.add_argument("--no-channels-last", action="store_true", help="inference.channels_last=false")
    parser.add_argument("--compile", action="store_true", help="inference.compile=true (torch.compile the UNet)")
    return parser


def config_for(args: argparse.Namespace):
    """The checkpoint's config (or --config files) with --set overrides, then the flags' settings."""
    overrides = list(args.overrides)
    if args.sampler:
        overrides.append(f"sampler.name={args.sampler}")
    if args.steps is not None:
        overrides.append(f"sampler.steps={args.steps}")
    if args.global_only:
        overrides.append("global_local.enabled=false")
    if args.precision:
        overrides.append(f"inference.precision={args.precision}")
    if args.no_channels_last:
        overrides.append("inference.channels_last=false")
    if args.compile:
        overrides.append("inference.compile=true")
    return eval_config(args.ckpt, overrides, args.config)


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
