"""The whole inference of one batch of radiographs: encode, sample (one or two paths), decode, fuse,
and bring the result back to each input's native size (method.md §5, issue 7).

    suppressor = BoneSuppressor(unet, vqgan, schedule, cfg)          # built once
    results = suppressor([pixels, ...], [mask or None, ...], [name, ...])

Pixel space is [0, 1] display (bones bright). Per image:

1. CXR at native size (H, W) -> model size S (bilinear) -> [-1, 1]; with the global-local path,
   the lung-masked copy (min-max stretch, zero outside the lungs, as in training data, §1.4) too.
2. One batched VQ encoding of every condition image.
3. Sampling: the global path alone (``global_local.enabled: false``) or both paths with
   Local-Enhanced Guidance, one batched UNet call per step (``models.global_local``). Every image
   has its own generators (seeded from ``sampler.seed`` and its name), so a result does not depend on
   the batch it was computed in.
4. One batched decoding; global-local fusion at model size (``models.fusion.fuse``).
5. Native size: ``output.mode: native_residual`` (default) upsamples the predicted bone layer
   (model-size CXR − model-size soft tissue) and subtracts it from the full-resolution input, so
   the input's native detail survives; ``resize`` upsamples the soft-tissue image itself. With
   ``output.residual_reference: decoded`` (default) the model-size CXR is the CXR's own latent
   decoded by the same VQGAN, so the autoencoder's reconstruction error is common to both terms and
   cancels in the bone layer; ``input`` uses the resized input.
"""
from __future__ import annotations

import zlib
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
        cond_images = [resize(to_model(p, invert), size) for p in images]
        if self.global_local:
            cond_images += [resize(to_model(masked_copy(p, m), invert), size) for p, m in zip(images, masks)]
        gens = [image_generators(cfg.sampler.seed, n) for n in names]
        t0 = time.perf_counter()
        conds = self.vqgan.encode_stage_2_inputs(torch.stack(cond_images).to(self.device))
        t1 = time.perf_counter()
        b = len(images)
        if self.global_local:
            z_g, z_l = dual_path_sample(self.unet, self.schedule, conds[:b], conds[b:], cfg.sampler, cfg.global_local,
                                        self.cond_mode, [g for g, _ in gens], [l for _, l in gens],
                                        progress=progress, leg_std_channels=cfg.global_local.leg_std_channels)
            latents = torch.cat([z_g, z_l])
        else:
            latents = suppress_latents(self.unet, self.schedule, conds, cfg.sampler, self.cond_mode,
                                       [g for g, _ in gens], progress=progress)
        t2 = time.perf_counter()
        decoded_ref = self.cfg.output.mode == "native_residual" and self.cfg.output.residual_reference == "decoded"
        if decoded_ref:
            latents = torch.cat([latents, conds[:b]])
        decoded = from_model(self.vqgan.decode(latents).float(), invert)[:, 0]       # (n, S, S) [0, 1]
        t3 = time.perf_counter()
        results = []
        n_paths = 2 if self.global_local else 1
        for i, pixels in enumerate(images):
            cxr_model = from_model(cond_images[i], invert)[0]
            reference = decoded[n_paths * b + i] if decoded_ref else cxr_model
            g_img = decoded[i]
            if self.global_local:
                mask_model = resize(torch.from_numpy(masks[i].astype(np.float32))[None], size, mode="nearest")[0]
                mask_model = mask_model.numpy() > 0.5
                l_img = decoded[b + i]
                fused = fuse(g_img, l_img, mask_model, cxr_model, mode=cfg.global_local.fusion,
                             min_component_px=cfg.global_local.min_component_px,
                             poisson_domain=cfg.global_local.poisson_domain)
            else:
                mask_model, l_img, fused = None, None, np.clip(g_img, 0, 1)
            results.append(Suppressed(soft=self.to_native(pixels, reference, fused), global_img=g_img,
                                      local_img=l_img, fused=fused, mask=mask_model))
        t4 = time.perf_counter()
        for k, v in zip(self.times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            self.times[k] += v
        return results

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


def upsample(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(S, S) -> (H, W), bilinear with half-pixel centres."""
    return resize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], size)[0].numpy()
