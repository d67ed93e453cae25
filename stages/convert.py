"""Conversion of the authors' published BS-LDM / GL-LCM weights, and export of a run, as a library (what
``convert_reference.py`` runs: :func:`convert_published`, :func:`export_run`; its command line:
:func:`build_parser`, :func:`run`).

Conversion reads the two whole-model pickles of the reference code (``torch.save(model)`` of its
guided-diffusion ``UNetModel`` and of MONAI-Generative's ``VQVAE``) with a restricted unpickler that
runs nothing from them (``utils/foreign_pickle.py``), maps the VQVAE's names onto ours, checks every
key and shape against the published architecture, and writes:

    DIR/vqgan.pt, DIR/ldm.pt           checkpoints of this project (``ldm_eval.py --ckpt DIR/ldm.pt``)
    DIR/vqgan.safetensors, DIR/ldm.safetensors, DIR/config.yaml, DIR/MODEL_CARD.md   the release

The config is the published one for the method and dataset: ``configs/<dataset>.yaml`` (+
``configs/bs-ldm.yaml``) + ``configs/published.yaml`` (condition mode, LEG, fusion and output as
released), with the codebook size and the q/k/v attention order read from the files and the
SHA-256 of both files recorded. ``--set`` changes any other key (e.g. ``data.root`` for your copy of
the dataset, or the architecture of a model trained with the reference code at other sizes).

``--export`` writes the release (safetensors, config, model card) of any checkpoint of this project.
Existing files in DIR are kept unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.reference import DATASETS, METHODS, PUBLISHED_SCORES, convert_reference
from utils.checkpoint import save_checkpoint
from utils.config import Config, ConfigError, load_config
from utils.release import export_release

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OUTPUTS = ("vqgan.pt", "ldm.pt", "vqgan.safetensors", "ldm.safetensors", "config.yaml", "MODEL_CARD.md")


def published_config(method: str, dataset: str, overrides: list[str] = ()) -> Config:
    """The published hyper-parameters of ``method`` on ``dataset``, with ``overrides``."""
    files = [CONFIGS / f"{dataset}.yaml"] + ([CONFIGS / "bs-ldm.yaml"] if method == "bs-ldm" else [])
    return load_config(files + [CONFIGS / "published.yaml"], [f"run.name={method}-{dataset}", *overrides])


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace earlier outputs or to write where nothing can be written."""
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out}: already holds {', '.join(existing)}; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out exists and is not a folder")


def convert_published(cfg: Config, method: str, dataset: str, unet: str | Path, vqgan: str | Path,
                      out: str | Path, overwrite: bool = False) -> list[Path]:
    """Convert one published UNet + VQGAN pair into ``out``; return the written files."""
    out = Path(out)
    check_out_dir(out, overwrite)
    for flag, f in (("--unet", unet), ("--vqgan", vqgan)):
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: {flag} file not found")
    print(f"reading {unet} and {vqgan} (zip-format files only, restricted unpickler, nothing in them is run) ...")
    vq, ldm = convert_reference(cfg, unet, vqgan, method, dataset)
    written: list[Path] = []
    try:
        write_outputs(method, dataset, vq, ldm, out, written)
    except BaseException:
        for p in written:            # a half conversion would make the rerun refuse without --overwrite
            p.unlink(missing_ok=True)
        raise
    attn = ldm["extra"]["attention_order"]
    print(f"converted {method} ({dataset}): codebook {ldm['config']['vqgan']['num_embeddings']}, attention order "
          f"{attn} -> " + ", ".join(str(p) for p in written))
    return written


def save_checked(path: Path, ckpt: dict) -> Path:
    """``save_checkpoint``; a failed write (a full disk: torch raises RuntimeError, naming no file) is one
    OSError naming ``path``."""
    try:
        save_checkpoint(path, **ckpt)
    except (OSError, RuntimeError) as e:
        lines = str(e).strip().splitlines()
        why = getattr(e, "strerror", None) or (lines[0] if lines else type(e).__name__)
        raise OSError(f"{path}: not written ({why})") from None
    return path


def write_outputs(method: str, dataset: str, vq: dict, ldm: dict, out: Path, written: list[Path]) -> None:
    """The two checkpoints and the release of a conversion, each appended to ``written`` once it exists
    (the release removes its own files if it fails)."""
    written.append(save_checked(out / "vqgan.pt", vq))
    written.append(save_checked(out / "ldm.pt", ldm))
    vq["state"] = ldm["state"] = None          # free 1.5 GB before the release is written from ldm.pt
    src = ldm["extra"]["source"]
    source = [f"Converted by `convert_reference.py` from the authors' published {method.upper()} weights for "
              f"{dataset.upper()}:"] + [f"`{s['file']}` (SHA-256 `{s['sha256']}`)" for s in src.values()] + [
              f"q/k/v attention order read from the file: {ldm['extra']['attention_order']}; raw weights (the "
              "authors kept no EMA), in both the `unet` and `ema` slots."]
    note = ("The published test-set scores of these weights (GL-LCM paper; the BS-LDM row is that paper's run of "
            "BS-LDM), computed by the reference metric code. `metrics.py --mode faithful` computes the same "
            "metrics on the outputs of `ldm_eval.py --ckpt ldm.safetensors` over the same test split.")
    written += export_release(
        out / "ldm.pt", out, weights="both", title=f"{method.upper()} on {dataset.upper()} (published weights)",
        source=source, scores=PUBLISHED_SCORES[(method, dataset)], scores_note=note)


def export_run(ckpt: str | Path, out: str | Path, weights: str = "ema", overwrite: bool = False) -> list[Path]:
    """Write the release folder of a checkpoint of this project."""
    out = Path(out)
    check_out_dir(out, overwrite)
    written = export_release(ckpt, out, weights=weights)
    print("exported -> " + ", ".join(str(p) for p in written))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Convert the published BS-LDM / GL-LCM weights, or export a run.")
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--dataset", choices=DATASETS, default="szch")
    parser.add_argument("--unet", help="the reference UNet pickle (.pth)")
    parser.add_argument("--vqgan", help="the reference VQGAN (MONAI VQVAE) pickle (.pth)")
    parser.add_argument("--export", metavar="CKPT", help="instead: write the release of a checkpoint of this project")
    parser.add_argument("--weights", choices=["ema", "raw", "both"], default="ema",
                        help="with --export: which UNet weights to release (default ema)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a key of the published config (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    if args.export:
        if args.method or args.unet or args.vqgan or args.overrides:
            raise ConfigError("--export takes only --out, --weights and --overwrite")
        return export_run(args.export, args.out, args.weights, args.overwrite)
    missing = [f for f, v in (("--method", args.method), ("--unet", args.unet), ("--vqgan", args.vqgan)) if not v]
    if missing:
        raise ConfigError(f"conversion needs {', '.join(missing)} (or use --export CKPT)")
    cfg = published_config(args.method, args.dataset, args.overrides)
    return convert_published(cfg, args.method, args.dataset, args.unet, args.vqgan, args.out, args.overwrite)
