"""The safetensors release format: weights that load without any pickle, plus what they need.

A ``.safetensors`` file holds only named tensors and a string header, so loading it can run no code
and needs no trust in its source. A release of this project is one file per stage::

    vqgan.safetensors   tensors "model.<key>"; header: format, kind "vqgan", step, epoch, config (JSON)
    ldm.safetensors     tensors "unet.<key>" and/or "ema.<key>"; header also: extra (JSON), aliases
                        (JSON, e.g. {"ema": "unet"} when both slots hold the same weights)

Each header carries the whole config, so :func:`utils.checkpoint.load_checkpoint` returns the same
dict for a ``.safetensors`` file as for a ``.pt`` checkpoint, and every loader accepts both. The
stage-2 config names its first stage relative to its own folder (``vqgan.safetensors``).

This module writes releases; reading one is :func:`utils.checkpoint.load_safetensors` (so the
dependency runs one way: release -> checkpoint).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from utils.atomic import atomic_write, json_text
from utils.checkpoint import FORMAT, CheckpointError, load_checkpoint, resolve_first_stage


def save_safetensors(path: str | Path, *, kind: str, step: int, epoch: int, config: dict,
                     state: dict[str, dict[str, torch.Tensor]], extra: dict | None = None,
                     aliases: dict[str, str] | None = None) -> None:
    """Write ``state`` (slot -> state dict) as one safetensors file, atomically.

    Args:
        aliases: slots stored once and read under another name too ({"ema": "unet"}).
        extra: JSON-able facts (latent size, sources); other values are dropped.
    """
    from safetensors.torch import save_file

    tensors = {f"{slot}.{k}": t.detach().to("cpu").contiguous() for slot, sd in state.items() for k, t in sd.items()}
    header = {"format": FORMAT, "kind": kind, "step": str(int(step)), "epoch": str(int(epoch)),
              "config": json_text(config), "extra": json_text(_jsonable(extra or {})),
              "aliases": json_text(aliases or {})}
    _write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _write(path: str | Path, write) -> None:
    """``atomic_write`` whose failures (a full disk: OSError from Python, SafetensorError from the Rust
    writer, which names no file) are one OSError naming ``path``; nothing is left at ``path``."""
    from safetensors import SafetensorError

    try:
        atomic_write(path, write)
    except (OSError, SafetensorError) as e:
        why = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
        raise OSError(f"{path}: not written ({why})") from None


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            continue                              # e.g. a saved RNG state: meaningless in a release
        out[k] = v
    return out


# ---- a release folder ------------------------------------------------------------------------------

def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def export_release(ckpt_path: str | Path, out_dir: str | Path, weights: str = "ema", title: str | None = None,
                   source: list[str] | None = None, scores: dict[str, str] | None = None,
                   scores_note: str = "") -> list[Path]:
    """Write a release folder from a checkpoint of this project (``.pt`` or ``.safetensors``).

    For a stage-2 checkpoint: ``vqgan.safetensors`` (its first stage), ``ldm.safetensors`` with the
    ``weights`` slot ("ema", "raw" or "both"; identical slots are stored once), ``config.yaml`` and
    ``MODEL_CARD.md``. For a VQGAN checkpoint: ``vqgan.safetensors``, its config and card.
    Returns the written paths. Raises CheckpointError on an unusable checkpoint or slot.
    """
    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("kind") not in ("ldm", "vqgan"):
        raise CheckpointError(f"{ckpt_path}: is a '{ckpt.get('kind')}' checkpoint; export takes a stage-1 (vqgan) "
                              "or stage-2 (ldm) checkpoint")
    ckpt["config"] = release_config(ckpt, ckpt_path)
    vq = ckpt if ckpt["kind"] == "vqgan" else load_checkpoint(
        resolve_first_stage(ckpt_path, ckpt["config"]["ldm_train"]["vqgan_ckpt"]), kind="vqgan")
    if "model" not in vq["state"]:
        raise CheckpointError(f"{ckpt_path}: the first stage holds no 'model' weights")
    vq["config"] = release_config(vq, ckpt_path if vq is ckpt else Path(f"{ckpt_path} (first stage)"))
    written: list[Path] = []
    try:
        _write_release(ckpt_path, ckpt, vq, out, weights, written, title, source, scores, scores_note)
    except BaseException:
        for p in written:            # a half release would block the rerun (existing outputs are kept)
            p.unlink(missing_ok=True)
        raise
    return written


# The sections the release and its model card read; every config this project ever wrote has them.
RELEASE_SECTIONS = ("run", "data", "vqgan", "unet", "diffusion", "ldm_train", "sampler", "global_local", "output")


def release_config(ckpt: dict, path: Path) -> dict:
    """The checkpoint's config, checked like every loader checks it (schema, types, ranges), as a plain dict;
    a config without a section the release reads is refused by name instead of a KeyError."""
    from utils.config import ConfigError, config_from_dict, config_to_dict

    raw = ckpt.get("config")
    missing = [s for s in RELEASE_SECTIONS if not isinstance(raw, dict) or not isinstance(raw.get(s), dict)]
    if missing:
        raise CheckpointError(f"{path}: its config lacks the section{'s' * (len(missing) > 1)} "
                              f"{', '.join(missing)}; not a complete checkpoint of this project")
    try:
        return config_to_dict(config_from_dict(raw, f"{path} (config)"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except RecursionError:
        raise CheckpointError(f"{path}: its config is nested too deeply") from None


def _write_release(ckpt_path: Path, ckpt: dict, vq: dict, out: Path, weights: str, written: list[Path],
                   title: str | None, source: list[str] | None, scores: dict[str, str] | None,
                   scores_note: str) -> None:
    """The files of :func:`export_release`, each appended to ``written`` once it exists."""
    import yaml


    def saved(path: Path) -> Path:
        written.append(path)
        return path

    save_safetensors(out / "vqgan.safetensors", kind="vqgan", step=vq["step"], epoch=vq["epoch"],
                     config=vq["config"], state={"model": vq["state"]["model"]}, extra=vq.get("extra"))
    saved(out / "vqgan.safetensors")
    config = vq["config"]
    if ckpt["kind"] == "ldm":
        config = json.loads(json_text(ckpt["config"]))
        config["ldm_train"]["vqgan_ckpt"] = "vqgan.safetensors"
        slots = {"ema": ["ema"], "raw": ["unet"], "both": ["unet", "ema"]}[weights]
        missing = [s for s in slots if s not in ckpt["state"]]
        if missing:
            raise CheckpointError(f"{ckpt_path}: holds no '{missing[0]}' weights (it has {sorted(ckpt['state'])})")
        state, aliases = {s: ckpt["state"][s] for s in slots}, {}
        if len(slots) == 2 and _same_weights(state["unet"], state["ema"]):
            state, aliases = {"unet": state["unet"]}, {"ema": "unet"}
        save_safetensors(out / "ldm.safetensors", kind="ldm", step=ckpt["step"], epoch=ckpt["epoch"],
                         config=config, state=state, extra=ckpt.get("extra"), aliases=aliases)
        saved(out / "ldm.safetensors")
    text = ("# The config stored in the .safetensors headers (which is what the loaders read), as YAML for "
            "reading.\n" + yaml.safe_dump(config, sort_keys=False))
    _write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    saved(out / "config.yaml")
    files = {p.name: sha256(p) for p in written}
    card = model_card(config, kind=ckpt["kind"], title=title or f"{config['run']['name']} ({ckpt['kind']})",
                      source=source or [f"Trained with this project: `{ckpt_path}` (step {ckpt['step']}, "
                                        f"weights: {weights})."],
                      scores=scores, scores_note=scores_note, files=files)
    _write(out / "MODEL_CARD.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    saved(out / "MODEL_CARD.md")


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_card(config: dict, *, kind: str, title: str, source: list[str], scores: dict[str, str] | None,
               scores_note: str, files: dict[str, str]) -> str:
    """MODEL_CARD.md for a release: what the weights are, their intended use, input conventions, scores."""
    d, s, gl, u, v = (config[k] for k in ("data", "sampler", "global_local", "unet", "vqgan"))
    lines = [f"# Model card: {title}", "",
             "**Intended use: research on bone suppression in chest radiographs. Not for diagnosis**, and not "
             "validated for any clinical decision. The output is a generated image: it can hide or invent "
             "structure, so read it beside the original radiograph.", "", "## Source", ""]
    lines += [f"- {x}" for x in source]
    lines += ["", "## What it is", "",
              f"- First stage (`vqgan.safetensors`): ML-VQGAN, widths {v['channels']}, {v['num_embeddings']} codes of "
              f"dimension {v['embedding_dim']}; a {d['image_size']}² image becomes a "
              f"{v['embedding_dim']}×{d['image_size'] // 2 ** len(v['channels'])}² latent."]
    if kind == "ldm":
        method = "GL-LCM (global and lung-local paths, fused)" if gl["enabled"] else "BS-LDM (one global path)"
        lines += [f"- Noise estimator (`ldm.safetensors`): guided-diffusion UNet, {u['model_channels']} channels × "
                  f"{u['channel_mult']}, q/k/v attention order: {'new' if u['use_new_attention_order'] else 'legacy'}, "
                  f"condition mode `{config['diffusion']['cond_mode']}`, schedule `{config['diffusion']['beta_schedule']}`.",
                  f"- Method: {method}; sampler `{s['name']}`, {s['steps']} steps, clip ranges r0 = "
                  f"{s['clip_r0_global']} (global), {s['clip_r0_local']} (local), +{s['clip_kappa']} per step."]
    lines += ["", "## Input conventions", "",
              "- One grayscale chest radiograph per file (PNG 8/16-bit, JPEG, TIFF or DICOM), any size: it is "
              f"resized to {d['image_size']}² for the model and the result is brought back to the input's size "
              f"(`output.mode: {config['output']['mode']}`).",
              "- Bones bright, as displayed (DICOM MONOCHROME1 is inverted on reading)."
              + (" The model was trained on negatives (`data.invert: true`): inputs are inverted before encoding "
                 "and outputs inverted back." if d["invert"] else "")]
    if kind == "ldm" and gl["enabled"]:
        lines.append("- Lung masks (255 = lung, same size as the image) from `--masks DIR`, `<data.root>/Mask` for "
                     "a split, or the built-in segmenter (`--set global_local.masks=auto`).")
    if kind == "ldm":
        lines += ["", "## Run it", "", "```",
                  "python ldm_eval.py --ckpt ldm.safetensors --input CXR_FOLDER --out OUT_FOLDER"
                  + (" --masks MASK_FOLDER" if gl["enabled"] else ""), "```"]
    lines += ["", "## Scores", ""]
    if scores:
        lines += ["| " + " | ".join(scores) + " |", "|" + "---|" * len(scores), "| " + " | ".join(scores.values()) + " |"]
    else:
        lines.append("No scores are recorded with these weights; measure them with `metrics.py` on your test pairs.")
    if scores_note:
        lines += ["", scores_note]
    lines += ["", "## Files (SHA-256)", ""] + [f"- `{name}`: `{digest}`" for name, digest in files.items()]
    return "\n".join(lines) + "\n"
