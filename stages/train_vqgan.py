"""Stage 1 as a library: train the ML-VQGAN with the multi-level hybrid loss (docs/method.md §2); what
``vq-gan_train.py`` runs.

Trains on the CXR ∪ soft-tissue images of the train split (plus their lung-masked copies when
``data.use_masked``) and validates on the val split only (the reference leaked masked training
images into validation, §7.11). Generator and discriminator have their own Adam optimisers and
MultiStepLR schedules whose milestones are given in epochs and converted to iterations (the
reference's were not, and its D scheduler drove G's optimiser, §7.10).

A run folder ``<run.out_dir>/vqgan/<NNN>-<run.name>/`` receives config.yaml, log.txt, metrics.csv,
curves.png, samples/val_<epoch>.png (input | reconstruction | |error|×4) and checkpoints/
(step_*.pt, the last ``keep_last``; best.pt by validation reconstruction loss; latest.json).
``--resume RUN`` continues from the newest checkpoint of RUN exactly as if it had not stopped.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data.datasets import BS, CXR, MASKED_BS, MASKED_CXR, ImageDataset, split_list
from models import build_discriminator, build_hybrid_loss, build_vqgan, count_parameters
from models.msssim import MSSSIM
from models.vqgan import codebook_counts, usage_from_counts
from utils.config import Config
from utils.dist import DistInfo, all_reduce_mean, autocast_context, seed_everything
from utils.hub import VGG16_FILE, require_hub_file
from utils.logging import get_logger, plot_curves, save_grid
from utils.training import RunCheckpoints, check_finite, iteration_milestones, prepare_run_dir, run_training

STAGE = "vqgan"
# Config sections a resumed run must share with its checkpoint (the rest may be changed).
FROZEN_SECTIONS = ("vqgan", "discriminator", "vq_loss", "data")


def image_subdirs(cfg) -> list[str]:
    """Image folders the autoencoder learns from (§1.5)."""
    return [CXR, BS] + ([MASKED_CXR, MASKED_BS] if cfg.data.use_masked else [])


def build_dataloaders(cfg, info: DistInfo) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Train loader (sharded, shuffled per epoch from run.seed) and the val loader (rank 0, fixed order)."""
    d = cfg.data
    train_ds = ImageDataset(d.root, split_list(d, "train"), image_subdirs(cfg), d.image_size, d.invert, d.max_pixels)
    val_ds = ImageDataset(d.root, split_list(d, "val"), image_subdirs(cfg), d.image_size, d.invert, d.max_pixels)
    if len(train_ds) == 0:
        raise ValueError(f"{d.root}: the train split is empty")
    # One code path: the sampler also shuffles a single process, so the epoch order depends only on
    # (run.seed, epoch) and a resumed run sees exactly the batches it would have seen.
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.run.seed)
    pin = info.device.type == "cuda"
    train = DataLoader(train_ds, batch_size=cfg.vq_train.batch_size, sampler=sampler, num_workers=d.num_workers,
                       pin_memory=pin, drop_last=False, persistent_workers=d.num_workers > 0)
    val = DataLoader(val_ds, batch_size=cfg.vq_train.batch_size, shuffle=False, num_workers=d.num_workers,
                     pin_memory=pin)
    return train, val, sampler


@torch.no_grad()
def evaluate(model, loader: DataLoader, cfg, device: torch.device) -> tuple[dict[str, float], tuple]:
    """Validation: reconstruction loss, PSNR, MS-SSIM (when the images are large enough) and codebook use.

    Returns:
        (scalars prefixed ``val_``, (x, x_rec) of the first batch for the sample grid).
    """
    model.eval()
    msssim = MSSSIM(data_range=2.0, reduction="none").to(device) if cfg.data.image_size >= 16 else None
    totals = {"rec": 0.0, "psnr": 0.0, "msssim": 0.0}
    counts = torch.zeros(model.num_embeddings, dtype=torch.long)
    n, first = 0, None
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        x_rec, _, info = model(x)
        x_rec = x_rec.float()
        per_image = (x_rec - x).pow(2).flatten(1).mean(1) if cfg.vq_loss.recon == "mse" \
            else (x_rec - x).abs().flatten(1).mean(1)
        totals["rec"] += per_image.sum().item()
        mse01 = ((x_rec.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
        totals["psnr"] += (-10 * torch.log10(mse01.clamp_min(1e-10))).sum().item()
        if msssim is not None:
            totals["msssim"] += msssim(x_rec, x).sum().item()
        counts += codebook_counts(info["indices"].cpu(), model.num_embeddings)
        n += len(x)
        if first is None:
            first = (x[:4].cpu(), x_rec[:4].cpu())
    model.train()
    if n == 0:
        return {}, None
    out = {f"val_{k}": v / n for k, v in totals.items() if k != "msssim" or msssim is not None}
    usage = usage_from_counts(counts)
    out.update(val_perplexity=float(usage["perplexity"]), val_unused_codes=float(usage["unused"]))
    return out, first


def train_vqgan(cfg: Config, resume: str | Path | None = None, progress: bool = True) -> Path:
    """Train; return the run folder. See the module docstring. ``cfg`` is what runs, as given (this
    stage takes nothing from other checkpoints), and what config.yaml and the checkpoints hold."""
    return run_training(_train, cfg, resume, progress)


def _train(cfg: Config, info: DistInfo, resume, progress: bool) -> Path:
    device = info.device
    seed_everything(cfg.run.seed, info.rank)
    tc = cfg.vq_train

    # ---- everything that can be checked is checked before the run folder exists ----------------
    train_loader, val_loader, sampler = build_dataloaders(cfg, info)
    if cfg.vq_loss.perceptual_weight > 0:
        require_hub_file(VGG16_FILE, "the perceptual loss (LPIPS-VGG, vq_loss.perceptual_weight > 0)")

    run_dir = prepare_run_dir(cfg, info, STAGE, resume)
    log = get_logger(run_dir, info.is_main, name=STAGE)

    # ---- models, loss, optimisers (the loss checks for its pretrained weights before any work) ---
    model = build_vqgan(cfg.vqgan).to(device)
    disc = build_discriminator(cfg.discriminator, cfg.vqgan.in_channels).to(device) \
        if cfg.vq_loss.adversarial_weight > 0 else None
    if info.distributed and device.type == "cuda" and disc is not None:
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    model_ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.distributed else model
    disc_ddp = DistributedDataParallel(disc, device_ids=[device.index] if device.type == "cuda" else None) \
        if (info.distributed and disc is not None) else disc
    loss_fn = build_hybrid_loss(cfg.vq_loss, discriminator=disc_ddp).to(device)

    steps_per_epoch = len(train_loader)
    betas = tuple(tc.betas)
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tc.lr_g, betas=betas)
    # Milestones are epochs; the schedulers step once per iteration.
    milestones = iteration_milestones(tc.milestones, steps_per_epoch)
    sched_g = torch.optim.lr_scheduler.MultiStepLR(opt_g, milestones, gamma=tc.gamma)
    opt_d = sched_d = None
    if disc is not None:
        opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr_d, betas=betas)
        sched_d = torch.optim.lr_scheduler.MultiStepLR(opt_d, milestones, gamma=tc.gamma)

    parts = {"model": model, "opt_g": opt_g, "sched_g": sched_g}
    if disc is not None:
        parts.update(disc=disc, opt_d=opt_d, sched_d=sched_d)
    ckpts = RunCheckpoints(run_dir, STAGE, cfg, info, log, tc.keep_last, parts)
    start_epoch, step, best, metrics_log = ckpts.begin(resume is not None, FROZEN_SECTIONS)
    log.info(f"run {run_dir} | {info.world_size} process(es) on {device} | VQGAN {count_parameters(model):,} params"
             + (f", discriminator {count_parameters(disc):,}" if disc is not None else "")
             + f" | {len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, "
             f"{steps_per_epoch} iterations per epoch")

    amp = autocast_context(device, tc.amp)
    skipped = 0
    loss_fn.train()
    for epoch in range(start_epoch, tc.epochs):
        sampler.set_epoch(epoch)
        model.train()
        bar = tqdm(train_loader, desc=f"vqgan epoch {epoch + 1}/{tc.epochs}", disable=not (progress and info.is_main),
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            x = batch["image"].to(device, non_blocking=True)
            with amp:
                x_rec, commit, vq_info = model_ddp(x)
                loss_g, logs = loss_fn.generator_loss(x, x_rec, commit, step)
            if not check_finite(loss_g, "generator", step, epoch, ckpts.manager, info, tc.on_nonfinite):
                skipped += 1
                log.info(f"skipped a batch with a non-finite generator loss at step {step} ({skipped} so far)")
                continue
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            sched_g.step()
            if disc is not None:
                with amp:
                    loss_d, logs_d = loss_fn.discriminator_loss(x, x_rec, step)
                if loss_d.requires_grad:
                    if check_finite(loss_d, "discriminator", step, epoch, ckpts.manager, info, tc.on_nonfinite):
                        opt_d.zero_grad(set_to_none=True)
                        loss_d.backward()
                        opt_d.step()
                    else:
                        skipped += 1
                sched_d.step()
                logs.update(logs_d)
            step += 1
            logs.update(perplexity=float(vq_info["perplexity"]), skipped=float(skipped))
            if step % tc.log_every == 0 or step == 1:
                logs = all_reduce_mean(logs, info)
                if info.is_main:
                    bar.set_postfix(loss=f"{logs['loss_g']:.4f}", rec=f"{logs['rec']:.4f}")
                    metrics_log.log({"step": step, "epoch": epoch, "split": "train",
                                     "lr_g": sched_g.get_last_lr()[0],
                                     "lr_d": sched_d.get_last_lr()[0] if sched_d else 0.0, **logs})
        bar.close()

        last = epoch + 1 == tc.epochs
        is_best = False
        if info.is_main and ((epoch + 1) % tc.val_every == 0 or last):
            scores, first = evaluate(model, val_loader, cfg, device)
            if scores:
                is_best = scores["val_rec"] < best
                best = min(best, scores["val_rec"])
                metrics_log.log({"step": step, "epoch": epoch, "split": "val", **scores, "skipped": skipped})
                log.info(f"epoch {epoch + 1} step {step} | " + " ".join(f"{k} {v:.4g}" for k, v in scores.items()))
                x, x_rec = first
                err = ((x_rec - x).abs() * 4).clamp(0, 2) - 1      # |error| x4 mapped onto [-1, 1]
                save_grid(run_dir / "samples" / f"val_{epoch + 1:04d}.png", [x, x_rec.clamp(-1, 1), err])
            plot_curves(run_dir / "metrics.csv", run_dir / "curves.png",
                        ["loss_g", "rec", "loss_d", "val_rec"], title=f"VQGAN {run_dir.name}")
        if (epoch + 1) % tc.ckpt_every == 0 or last or is_best:
            ckpts.save(epoch=epoch, step=step, best=best, is_best=is_best)
    log.info(f"done: {run_dir}")
    return run_dir
