"""The whole inference of one batch of radiographs: encode, sample (one or two paths), decode, fuse,
and bring the result back to each input's native size (docs/method.md §5, issue 7).

    suppressor = BoneSuppressor(unet, vqgan, schedule, cfg)          # built once
    results = suppressor([pixels, ...], [mask or None, ...], [name, ...])

Pixel space is [0, 1] display (bones bright). Per image:

1. CXR at native size (H, W) -> model size S (bilinear) -> [-1, 1]; with the global-local path,
   the lung-masked copy (min-max stretch, zero outside the lungs, as in training data, §1.4) too.
2. One batched VQ encoding of every condition image. With ``inference.local_crop`` (default) the
   local path's masked copy is encoded only over the lungs' bounding box grown by
   ``inference.crop_margin`` latent pixels; the rest of its latent, which in a masked copy is a
   uniform black background, is that background's code.
3. Sampling: the global path alone (``global_local.enabled: false``) or both paths with
   Local-Enhanced Guidance, one batched UNet call per step (``models.global_local``). Every image
   has its own generators (seeded from ``sampler.seed`` and its name), so a result does not depend on
   the batch it was computed in.
4. One batched decoding of what is used (with ``local_crop``, the local path only over its lung box,
   which is all that fusion reads of it); global-local fusion at model size (``models.fusion.fuse``).
5. Native size: ``output.mode: native_residual`` (default) upsamples the predicted bone layer
   (model-size CXR − model-size soft tissue) and subtracts it from the full-resolution input, so
   the input's native detail survives; ``resize`` upsamples the soft-tissue image itself. With
   ``output.residual_reference: decoded`` (default) the model-size CXR is the CXR's own latent
   decoded by the same VQGAN, so the autoencoder's reconstruction error is common to both terms and
   cancels in the bone layer; ``input`` uses the resized input.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import torch

from data.masking import masked_copy
from data.transforms import from_model, resize, to_model
from models.fusion import fuse
from models.global_local import dual_path_sample
from models.inference import suppress_latents


def image_generators(seed: int, name: str) -> tuple[torch.Generator, torch.Generator]:
    """(global-path, local-path) generators of one image: they depend on the seed and the name only."""
    base = seed * 1_000_003 + zlib.crc32(name.encode())
    return (torch.Generator().manual_seed(base), torch.Generator().manual_seed(base + 7_919))


@dataclass
class Suppressed:
    """One result. ``soft``: (H, W) float32 [0, 1] at native size; the rest at model size (S, S)."""
    soft: np.ndarray
    global_img: np.ndarray
    local_img: np.ndarray | None
    fused: np.ndarray
    mask: np.ndarray | None


class BoneSuppressor:
    """Built once per run from the trained networks and the config; called on batches.

    Args:
        unet: trained noise estimator (eval mode).
        vqgan: the frozen first stage.
        schedule: the schedule the UNet was trained with.
        cfg: the run config (``data.image_size``, ``data.invert``, ``sampler``, ``global_local``,
            ``output``); ``cond_mode`` is the one the UNet was trained with.
    """

    def __init__(self, unet, vqgan, schedule, cfg, cond_mode: str):
        self.unet, self.vqgan, self.schedule, self.cfg, self.cond_mode = unet, vqgan, schedule, cfg, cond_mode
        self.device = next(unet.parameters()).device
        self.times = {"encode": 0.0, "sample": 0.0, "decode": 0.0, "fusion": 0.0}
        self._black: torch.Tensor | None = None
        if cfg.inference.crop_margin < 0:
            raise ValueError(f"inference.crop_margin must be >= 0, got {cfg.inference.crop_margin}")

    @property
    def global_local(self) -> bool:
        return self.cfg.global_local.enabled

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], masks: list[np.ndarray | None], names: list[str],
                 progress: bool = False) -> list[Suppressed]:
        import time

        cfg, size, invert = self.cfg, self.cfg.data.image_size, self.cfg.data.invert
        if self.global_local and any(m is None for m in masks):
            raise ValueError("the global-local path needs a lung mask for every image")
        b, f = len(images), self.vqgan.downsample_factor
        cond_images = [resize(to_model(p, invert), size) for p in images]
        mask_models = [None] * b
        boxes = [None] * b
        if self.global_local:
            cond_images += [resize(to_model(masked_copy(p, m), invert), size) for p, m in zip(images, masks)]
            mask_models = [resize(torch.from_numpy(m.astype(np.float32))[None], size, mode="nearest")[0].numpy() > 0.5
                           for m in masks]
            if cfg.inference.local_crop:
                boxes = [useful_box(lung_box(m, f, cfg.inference.crop_margin), size // f) for m in mask_models]
        gens = [image_generators(cfg.sampler.seed, n) for n in names]
        t0 = time.perf_counter()
        # One batched encoding of every full-size condition; the local paths with a useful lung box alone.
        full = list(range(b)) + [b + i for i in range(b) if boxes[i] is None] if self.global_local else list(range(b))
        z_full = self.vqgan.encode_stage_2_inputs(torch.stack([cond_images[j] for j in full]).to(self.device))
        conds = torch.empty((len(cond_images), *z_full.shape[1:]), device=z_full.device)
        conds[full] = z_full
        for i, box in enumerate(boxes):
            if box is not None:
                conds[b + i] = self.encode_local(cond_images[b + i], box)
        t1 = time.perf_counter()
        if self.global_local:
            z_g, z_l = dual_path_sample(self.unet, self.schedule, conds[:b], conds[b:], cfg.sampler, cfg.global_local,
                                        self.cond_mode, [g for g, _ in gens], [l for _, l in gens],
                                        progress=progress, leg_std_channels=cfg.global_local.leg_std_channels)
        else:
            z_g = suppress_latents(self.unet, self.schedule, conds, cfg.sampler, self.cond_mode,
                                   [g for g, _ in gens], progress=progress)
        t2 = time.perf_counter()
        decoded_ref = self.cfg.output.mode == "native_residual" and self.cfg.output.residual_reference == "decoded"
        # One batched decoding of what every image needs: its global latent, (its CXR latent for the
        # decoded reference,) and its local latent unless only the lungs' box of that is decoded.
        batch = [z_g] + ([conds[:b]] if decoded_ref else [])
        use_local = self.global_local and cfg.global_local.fusion != "none"      # "none" never reads it
        whole = [i for i in range(b) if boxes[i] is None] if use_local else []
        if whole:
            batch.append(z_l[whole])
        decoded = from_model(self.vqgan.decode(torch.cat(batch)).float(), invert)[:, 0]       # (n, S, S) [0, 1]
        g_imgs = decoded[:b]
        refs = decoded[b:2 * b] if decoded_ref else None
        l_imgs: list[np.ndarray | None] = [None] * b
        for k, i in enumerate(whole):
            l_imgs[i] = decoded[len(decoded) - len(whole) + k]
        if use_local:
            for i, box in enumerate(boxes):
                if box is not None:
                    l_imgs[i] = self.decode_local(z_l[i], box, g_imgs[i])
        t3 = time.perf_counter()
        results = []
        for i, pixels in enumerate(images):
            cxr_model = from_model(cond_images[i], invert)[0]
            reference = refs[i] if decoded_ref else cxr_model
            g_img = g_imgs[i]
            if self.global_local:
                fused = fuse(g_img, l_imgs[i] if l_imgs[i] is not None else g_img, mask_models[i], cxr_model,
                             mode=cfg.global_local.fusion, min_component_px=cfg.global_local.min_component_px,
                             poisson_domain=cfg.global_local.poisson_domain)
            else:
                fused = np.clip(g_img, 0, 1)
            results.append(Suppressed(soft=self.to_native(pixels, reference, fused), global_img=g_img,
                                      local_img=l_imgs[i], fused=fused, mask=mask_models[i]))
        t4 = time.perf_counter()
        for k, v in zip(self.times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.times[k] += v
        return results

    def black_latent(self) -> torch.Tensor:
        """(D,) the quantised latent of a uniform black image, as surrounds the lungs in a masked copy;
        taken at the centre of a 32x32-latent encoding, far from any padding. Computed once."""
        if self._black is None:
            f = self.vqgan.downsample_factor
            black = float(to_model(np.zeros((1, 1), np.float32), self.cfg.data.invert).flatten()[0])   # on [-1, 1]
            x = torch.full((1, 1, 32 * f, 32 * f), black, device=self.device)
            self._black = self.vqgan.encode_stage_2_inputs(x)[0, :, 16, 16].clone()
        return self._black

    def encode_local(self, masked: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        """(D, S/f, S/f) local-path condition of one masked copy (1, S, S): its lung box encoded alone,
        pasted into the latent of the uniform black background that surrounds the lungs."""
        f, n = self.vqgan.downsample_factor, self.cfg.data.image_size // self.vqgan.downsample_factor
        y0, y1, x0, x1 = box
        z = self.black_latent()[:, None, None].expand(-1, n, n).clone()
        z[:, y0:y1, x0:x1] = self.vqgan.encode_stage_2_inputs(
            masked[None, :, y0 * f:y1 * f, x0 * f:x1 * f].to(self.device))[0]
        return z

    def decode_local(self, z_l: torch.Tensor, box: tuple[int, int, int, int], g_img: np.ndarray) -> np.ndarray:
        """Decoded local-path image (S, S) [0, 1] of one latent (D, S/f, S/f): only its lung box is
        decoded; the rest, which fusion never reads from the local path, is the global image."""
        f = self.vqgan.downsample_factor
        y0, y1, x0, x1 = box
        img = g_img.copy()
        img[y0 * f:y1 * f, x0 * f:x1 * f] = from_model(
            self.vqgan.decode(z_l[None, :, y0:y1, x0:x1]).float(), self.cfg.data.invert)[0, 0]
        return img

    def to_native(self, pixels: np.ndarray, cxr_model: np.ndarray, soft_model: np.ndarray) -> np.ndarray:
        """Model-size soft tissue -> native size (``output.mode``); see :func:`to_native`."""
        return to_native(self.cfg.output.mode, pixels, cxr_model, soft_model)


def to_native(mode: str, pixels: np.ndarray, cxr_model: np.ndarray, soft_model: np.ndarray) -> np.ndarray:
    """Model-size soft tissue (S, S) -> native size (H, W) of ``pixels``, float32 [0, 1].

    ``mode`` is ``output.mode``; ``cxr_model`` is the model-size reference the bone layer is
    measured from in ``native_residual`` mode (see module doc).
    """
    native = tuple(pixels.shape)
    if mode == "resize":
        return np.clip(upsample(soft_model, native), 0, 1).astype(np.float32)
    bone = upsample(cxr_model - soft_model, native)
    return np.clip(pixels - bone, 0, 1).astype(np.float32)


@torch.no_grad()
def derivation_text(cfg, ckpt) -> str:
    """The Derivation Description of a derived DICOM instance (ldm_eval.py and the DICOM node write the same)."""
    gl = cfg.global_local
    return (f"Bone suppression by {'GL-LCM global-local' if gl.enabled else 'latent diffusion'} sampling "
            f"({cfg.sampler.name}, {cfg.sampler.steps} steps) of {Path(ckpt).name}; output "
            f"{cfg.output.mode}; research use, not for diagnosis")


def first_stage_ceiling(vqgan, cfg, cxr: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """What a perfect diffusion model would return: the true soft-tissue latent, decoded and sent
    through the same output path as a sampled one (``output.mode``, ``output.residual_reference``).

    No sampler or UNet can do better than this, so it is the first thing to measure when the
    results lack structure. Args: the frozen VQGAN (eval mode), the run config (``data``,
    ``output``), and one (H, W) [0, 1] CXR with its target. Returns the (H, W) float32 prediction.
    """
    size, invert = cfg.data.image_size, cfg.data.invert
    x = torch.stack([resize(to_model(p, invert), size) for p in (cxr, soft)])
    device = next(vqgan.parameters()).device
    decoded = from_model(vqgan.decode(vqgan.encode_stage_2_inputs(x.to(device))), invert)[:, 0]   # (2, S, S)
    reference = decoded[0] if cfg.output.residual_reference == "decoded" else from_model(x[0], invert)[0]
    return to_native(cfg.output.mode, cxr, reference, np.clip(decoded[1], 0, 1))


def lung_box(mask: np.ndarray, f: int, margin: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) on the latent grid (pixels / f): the bounding box of a model-size mask (S, S),
    grown by ``margin`` latent pixels and clipped to the image; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    n = mask.shape[0] // f
    return (max(int(ys.min()) // f - margin, 0), min(int(ys.max()) // f + 1 + margin, n),
            max(int(xs.min()) // f - margin, 0), min(int(xs.max()) // f + 1 + margin, mask.shape[1] // f))


def useful_box(box: tuple[int, int, int, int] | None, n: int, max_fraction: float = 0.9):
    """``box`` when it leaves out more than 10 % of the n x n latent grid, else None: encoding a crop
    alone costs a call of its own, which only pays when the crop is clearly smaller."""
    if box is None or (box[1] - box[0]) * (box[3] - box[2]) >= max_fraction * n * n:
        return None
    return box


def upsample(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) -> (H, W), bilinear with half-pixel centres."""
    return resize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], size)[0].numpy()
