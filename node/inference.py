"""The model of a node: loaded once, then called on batches of received films.

It makes what ``ldm_eval.py`` makes for the same file, through the same library calls: the
checkpoint's config (``models.checkpoints.checkpoint_config``) with the overrides, the model's own size and
intensity convention, ``models.load_ldm`` / ``load_vqgan``, ``models.precision.prepare_for_inference``,
``models.pipeline.BoneSuppressor`` (each image's noise seeded by ``sampler.seed`` and its file name:
the node's films are named ``<key>.dcm``), ``data.io.read_image`` and ``data.io.write_dicom`` with
the same derivation text. ``tests/test_dicom_node.py`` checks the node's pixels against
``ldm_eval.py``'s.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from data.io import ImageError, XrayImage, read_image, write_dicom
from utils.checkpoint import CheckpointError, resolve_first_stage
from utils.config import ConfigError

def node_config(ckpt: str | Path, overrides: list[str] = (), config_files: list | None = None,
                global_only: bool = False):
    """The config a node runs ``ckpt`` with: the checkpoint's own (or ``config_files``) with
    ``overrides``; the global-local path takes its lung masks from the built-in segmenter (a node has
    no mask folder).

    Raises:
        ConfigError: a bad override, or one of a key the checkpoint fixed.
        CheckpointError: not a stage-2 checkpoint of this project.
    """
    from models.checkpoints import checkpoint_config, fixed_by_checkpoint

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if fixed_by_checkpoint(key):
            raise ConfigError(f"--set {item}: {key} is fixed by the checkpoint; the node cannot change it")
    extra = ["global_local.enabled=false"] if global_only else []
    cfg = checkpoint_config(ckpt, "ldm", config_files, [*overrides, *extra])
    if cfg.global_local.enabled and cfg.global_local.masks != "auto":
        cfg = dataclasses.replace(cfg, global_local=dataclasses.replace(cfg.global_local, masks="auto"))
    return cfg


class NodeModel:
    """The loaded networks and the sampler; :meth:`process` turns films into derived instances.

    Args:
        ckpt: a stage-2 (LDM or distilled) checkpoint; its VQGAN is found as ``ldm_eval.py`` finds it.
        cfg: from :func:`node_config`.
        weights: ``ema`` or ``raw``.
    """

    def __init__(self, ckpt: str | Path, cfg, weights: str = "ema"):
        from models import load_ldm, load_vqgan
        from models.pipeline import BoneSuppressor, derivation_text
        from models.precision import prepare_for_inference
        from models.schedule import build_schedule
        from utils.dist import resolve_device

        self.ckpt = Path(ckpt)
        device = resolve_device(cfg.run.device)
        unet, train_cfg = load_ldm(ckpt, device, weights)
        given = cfg.ldm_train.vqgan_ckpt
        if given and given != train_cfg.ldm_train.vqgan_ckpt:
            if not Path(given).is_file():
                raise CheckpointError(f"ldm_train.vqgan_ckpt={given}: file not found")
            vq_path = Path(given)
        else:
            vq_path = resolve_first_stage(ckpt, train_cfg.ldm_train.vqgan_ckpt)
        vqgan, _ = load_vqgan(vq_path, device)
        unet, vqgan, self.arithmetic = prepare_for_inference(unet, vqgan, cfg.inference, device)
        data = dataclasses.replace(cfg.data, image_size=train_cfg.data.image_size, invert=train_cfg.data.invert)
        self.cfg = dataclasses.replace(cfg, data=data)
        self.suppressor = BoneSuppressor(unet, vqgan, build_schedule(train_cfg.diffusion), self.cfg,
                                         train_cfg.diffusion.cond_mode)
        self.derivation = derivation_text(self.cfg, ckpt)
        self.device = device      # (no global grad switch: BoneSuppressor runs under no_grad itself)

    def read(self, path: str | Path) -> tuple[XrayImage, object]:
        """A film and its lung mask (None for the global path alone).

        Raises:
            ImageError / ValueError: unreadable film, or no lungs found by the segmenter.
        """
        from data.masking import load_mask

        im = read_image(path, self.cfg.data.max_pixels)
        if im.dicom is None:
            raise ImageError(path, "not a DICOM file")
        mask = load_mask(Path(path), None, im.pixels, True, self.cfg.data.max_pixels) \
            if self.cfg.global_local.enabled else None
        return im, mask

    def process(self, jobs: list[tuple[Path, Path]]) -> list[tuple[float, str | None]]:
        """Run the films ``src`` of ``jobs`` as one batch and write each derived instance to its ``dst``.

        Returns, per job, (seconds, None) or (seconds, why it failed in one line); a film that cannot be
        read fails alone, the others go on.
        """
        t0 = time.perf_counter()
        out: list = [None] * len(jobs)
        batch = []
        for i, (src, _) in enumerate(jobs):
            try:
                batch.append((i, *self.read(src)))
            except (ImageError, ValueError) as e:
                out[i] = (time.perf_counter() - t0, str(e).replace(str(src), Path(src).name))
        if batch:
            results = self.suppressor([im.pixels for _, im, _ in batch], [m for _, _, m in batch],
                                      [Path(im.path).name for _, im, _ in batch])
            for (i, im, _), res in zip(batch, results):
                dst = jobs[i][1]
                try:
                    write_dicom(dst, res.soft, im, subtraction=self.cfg.output.mode == "native_residual",
                                derivation=self.derivation)
                    out[i] = (time.perf_counter() - t0, None)
                except ImageError as e:
                    out[i] = (time.perf_counter() - t0, str(e))
        return out
