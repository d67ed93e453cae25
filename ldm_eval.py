"""Stage 3: bone suppression of a split or a folder of radiographs with a trained latent diffusion model.

Usage:
    python ldm_eval.py --ckpt runs/ldm/000-demo/checkpoints/best.pt                   # the test split
    python ldm_eval.py --ckpt CKPT --split val --set sampler.steps=8
    python ldm_eval.py --ckpt CKPT --input some/cxr_folder --out some/output_folder
    python ldm_eval.py --ckpt CKPT --set sampler.name=ddpm --set sampler.steps=1000 \
        --set sampler.clip_r0_global=1.4 --set sampler.clip_kappa=0.003          # BS-LDM's sampler

Each CXR is read at native size, normalised (and inverted with ``data.invert``), resized to
``data.image_size``, encoded by the frozen VQGAN named in the checkpoint's config, sampled with
``sampler.*`` (temporal adaptive thresholding r_j = r0 + κ·j when ``sampler.clip``), decoded,
clipped, resized back to the source size and written with the source's bit depth as
``<out>/<name>`` (PNG; a DICOM input gives a PNG and a DICOM of the same study). Uses the EMA
weights unless ``--weights raw``. Each image's noise comes from its own generator, seeded by
``sampler.seed`` and the file name, so the same checkpoint, config and seed give the same image
whatever the batch or the order. Outputs that already exist are skipped (the run is resumable;
``--overwrite`` redoes them); the output folder may not be the input folder; a bad file is reported
and the others go on. ``timing.json`` records the seconds per image spent in encoding, sampling and
decoding. Default output: ``<run>/eval/<split>/``.

Score the outputs with ``metrics.py --cxr ROOT/CXR --gt ROOT/BS --pred OUT --list LIST``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from data.datasets import CXR, split_list
from data.io import ImageError, is_image_file, read_image, write_dicom, write_png
from data.transforms import from_model, resize, restore_size, to_model
from models import build_unet, load_vqgan
from models.inference import suppress_latents
from models.schedule import build_schedule
from utils.atomic import atomic_write_text
from utils.checkpoint import CheckpointError, load_checkpoint, load_state
from utils.config import ConfigError, config_from_dict, load_config
from utils.dist import resolve_device

STAGE = "ldm"


def load_ldm(path: str | Path, device: torch.device, weights: str = "ema"):
    """(UNet in eval mode, its training config, latent size) from a stage-2 checkpoint."""
    ckpt = load_checkpoint(path, kind=STAGE)
    cfg = config_from_dict(ckpt["config"], source=f"{path} (config)")
    unet = build_unet(cfg.unet, image_size=ckpt["extra"]["latent_size"])
    load_state(unet, ckpt["state"]["ema" if weights == "ema" else "unet"], path, weights)
    return unet.to(device).eval().requires_grad_(False), cfg


def image_jobs(cfg, split: str | None, input_dir: str | None) -> list[Path]:
    """Source CXR paths: a split's CXR/ images or every image of a folder."""
    if input_dir is not None:
        d = Path(input_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: input folder not found")
        return [p for p in sorted(d.iterdir()) if p.is_file() and is_image_file(p)]
    root = Path(cfg.data.root)
    return [root / CXR / n for n in split_list(cfg.data, split)]


def image_generator(seed: int, name: str) -> torch.Generator:
    """The generator of one image: depends on the seed and the file name only."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def output_name(path: Path) -> str:
    """PNG name of an output (a DICOM input also gets a .dcm beside it)."""
    return path.stem + ".png" if path.suffix.lower() in (".dcm", ".dicom") else path.name


def main(cfg, ckpt: str | Path, split: str | None = "test", input_dir: str | None = None,
         out_dir: str | Path | None = None, weights: str = "ema", batch_size: int = 4,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Suppress bones in every job image; return the timing summary (also written as timing.json)."""
    device = resolve_device(cfg.run.device)
    unet, train_cfg = load_ldm(ckpt, device, weights)
    vqgan, _ = load_vqgan(train_cfg.ldm_train.vqgan_ckpt, device)
    schedule = build_schedule(train_cfg.diffusion)
    jobs = image_jobs(cfg, split, input_dir)
    if not jobs:
        raise ValueError(f"no images to process ({input_dir or split})")
    out_dir = Path(out_dir) if out_dir else Path(ckpt).resolve().parent.parent / "eval" / (
        Path(input_dir).name if input_dir else split)
    if out_dir.exists() and any(out_dir.resolve() == p.parent.resolve() for p in jobs[:1]):
        raise ValueError(f"{out_dir}: the output folder is the input folder; choose another --out")
    skipped = [p for p in jobs if not overwrite and (out_dir / output_name(p)).is_file()]
    jobs = [p for p in jobs if p not in skipped]
    size, invert = train_cfg.data.image_size, train_cfg.data.invert
    times = {"encode": 0.0, "sample": 0.0, "decode": 0.0}
    failures, done = [], 0
    bar = tqdm(total=len(jobs), desc="bone suppression", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        images = []
        for path in jobs[start:start + batch_size]:
            try:
                images.append(read_image(path, cfg.data.max_pixels))
            except ImageError as e:
                failures.append({"name": path.name, "error": e.reason})
                print(f"ldm_eval.py: {e}", file=sys.stderr)
        bar.update(len(jobs[start:start + batch_size]) - len(images))
        if not images:
            continue
        x = torch.stack([resize(to_model(im.pixels, invert), size) for im in images]).to(device)
        with torch.no_grad():
            t0 = time.perf_counter()
            cond = vqgan.encode_stage_2_inputs(x)
            t1 = time.perf_counter()
            generators = [image_generator(cfg.sampler.seed, Path(im.path).name) for im in images]
            z = suppress_latents(unet, schedule, cond, cfg.sampler, train_cfg.diffusion.cond_mode, generators,
                                 progress=progress)
            t2 = time.perf_counter()
            pred = vqgan.decode(z).float().cpu()
            t3 = time.perf_counter()
        times["encode"] += t1 - t0
        times["sample"] += t2 - t1
        times["decode"] += t3 - t2
        for im, p in zip(images, pred):
            pixels = from_model(restore_size(p, im.size), invert)[0]
            if im.dicom is not None:
                write_dicom(out_dir / Path(im.path).name, pixels, im)
            write_png(out_dir / output_name(Path(im.path)), pixels, bit_depth=16 if im.bit_depth > 8 else 8,
                      inputs=(im.path,))
            done += 1
        bar.update(len(images))
    bar.close()
    summary = {"checkpoint": str(ckpt), "weights": weights, "images": len(jobs) + len(skipped), "written": done,
               "skipped_existing": len(skipped),
               "failures": failures, "sampler": {"name": cfg.sampler.name, "steps": cfg.sampler.steps,
                                                 "clip": cfg.sampler.clip, "r0": cfg.sampler.clip_r0_global,
                                                 "kappa": cfg.sampler.clip_kappa, "seed": cfg.sampler.seed},
               "seconds_per_image": {k: v / max(done, 1) for k, v in times.items()}}
    atomic_write_text(out_dir / "timing.json", json.dumps(summary, indent=2) + "\n")
    per = summary["seconds_per_image"]
    print(f"{done} of {len(jobs)} images written, {len(skipped)} already done, {len(failures)} failed -> {out_dir} | s/image: encode {per['encode']:.3f}, "
          f"sample {per['sample']:.3f} ({cfg.sampler.name} x{cfg.sampler.steps}), decode {per['decode']:.3f}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Bone suppression with a trained latent diffusion model.")
    parser.add_argument("--ckpt", required=True, help="stage-2 checkpoint (step_*.pt or best.pt)")
    parser.add_argument("--config", nargs="+", default=None, metavar="FILE",
                        help="configs for data paths and sampler settings instead of the checkpoint's own")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--split", default="test", choices=["train", "val", "test"])
    group.add_argument("--input", dest="input_dir", help="a folder of CXR images instead of a split")
    parser.add_argument("--out", dest="out_dir", help="output folder (default: <run>/eval/<split>)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "lcm"], help="override sampler.name")
    parser.add_argument("--steps", type=int, help="override sampler.steps")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def config_for(args: argparse.Namespace):
    """The checkpoint's config (or --config files) with --set overrides."""
    overrides = list(args.overrides)
    if args.sampler:
        overrides.append(f"sampler.name={args.sampler}")
    if args.steps is not None:
        overrides.append(f"sampler.steps={args.steps}")
    if args.config:
        return load_config(args.config, overrides)
    ckpt = load_checkpoint(args.ckpt, kind=STAGE)
    return config_from_dict(ckpt["config"], f"{args.ckpt} (config)", overrides)


if __name__ == "__main__":
    args = build_parser().parse_args()
    try:
        summary = main(config_for(args), args.ckpt, split=args.split, input_dir=args.input_dir,
                       out_dir=args.out_dir, weights=args.weights, batch_size=args.batch_size,
                       overwrite=args.overwrite, progress=args.progress)
    except (ConfigError, CheckpointError, ImageError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if summary["failures"] else 0)
